"""The shipped Fashion-MNIST defaults load from package files and do what the model card says."""

import json
from importlib import resources

import pytest
import torch

import pursamere_fast
from pursamere_fast import data
from pursamere_fast.nets import ConvScoreNet, SmallCNN
from pursamere_fast.pretrained import (
    CLASSIFIER_FILE, CONFIG_FILE, SCORE_FILE, TEST_SUBSET_FILE, fashion_mnist, recommended_config_dict)

# Measured on the shipped files (MODEL_CARD.md): 91.0% on these 1,000 images. The margin only
# absorbs platform float differences; the files themselves are fixed.
ACCURACY_1000_BOUND = 0.89


pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def defaults():
    return fashion_mnist()


def test_files_are_in_the_package_and_small():
    root = resources.files("pursamere_fast.pretrained")
    names = [SCORE_FILE, CLASSIFIER_FILE, TEST_SUBSET_FILE, CONFIG_FILE, "MODEL_CARD.md", "LICENSE-fashion-mnist.txt"]
    for name in names:
        assert root.joinpath(name).is_file(), name
    total = sum(len(root.joinpath(n).read_bytes()) for n in (SCORE_FILE, CLASSIFIER_FILE))
    assert total < 20 * 2**20
    assert "Copyright (c) 2017 Zalando SE" in root.joinpath("LICENSE-fashion-mnist.txt").read_text()
    assert json.loads(root.joinpath(CONFIG_FILE).read_text())["status"] == "validated"


def test_loads_without_any_dataset(monkeypatch, tmp_path):
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / "none"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    d = fashion_mnist()
    assert d.images.shape == (1000, 1, 28, 28)


def test_shapes_dtypes_and_types(defaults):
    d = defaults
    assert d.images.shape == (1000, 1, 28, 28) and d.images.dtype == torch.float32
    assert d.images.min() >= 0 and d.images.max() <= 1
    # uint8 on disk: every value is a multiple of 1/255.
    assert torch.equal(torch.round(d.images * 255) / 255, d.images)
    assert d.labels.shape == (1000,) and d.labels.dtype == torch.int64
    assert torch.equal(torch.bincount(d.labels, minlength=10) > 80, torch.ones(10, dtype=torch.bool))
    assert isinstance(d.score, ConvScoreNet) and isinstance(d.classifier, SmallCNN)
    assert not d.score.training and not d.classifier.training
    assert not any(p.requires_grad for p in d.classifier.parameters())


def test_config(defaults):
    cfg = defaults.config
    assert isinstance(cfg, pursamere_fast.PurifyConfig)
    assert cfg == pursamere_fast.PurifyConfig(**recommended_config_dict())
    assert cfg.norm == "linf" and cfg.rho == pytest.approx(16 / 255)
    assert cfg.num_steps == 10 and cfg.n_samples == 2 and cfg.sam_radius == 0.0


def test_classifier_accuracy_on_shipped_images(defaults):
    with torch.no_grad():
        pred = defaults.classifier(defaults.images).argmax(1)
    assert (pred == defaults.labels).float().mean().item() >= ACCURACY_1000_BOUND


@pytest.mark.parametrize("sigma", [0.1, 0.25])
def test_score_denoises_better_than_identity(defaults, sigma):
    x = defaults.images[:16]
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    y = x + sigma * z
    with torch.no_grad():
        x_hat = y + sigma ** 2 * defaults.score(y, torch.full((16,), sigma))
    # Measured ratio noisy/Tweedie MSE on 1,000 test images: see MODEL_CARD.md.
    assert (x_hat - x).pow(2).mean() < 0.5 * (y - x).pow(2).mean()


def test_recommended_config_purifies_clean_images_without_harm(defaults):
    x, y = defaults.images[:8], defaults.labels[:8]
    x_pur = pursamere_fast.purify(x, defaults.score, defaults.config, backend="torch")
    assert x_pur.shape == x.shape
    assert (x_pur - x).abs().max() <= defaults.config.rho + 1e-6
    with torch.no_grad():
        clean = defaults.classifier(x).argmax(1)
        purified = defaults.classifier(x_pur).argmax(1)
    assert (purified == y).sum() >= (clean == y).sum() - 1
