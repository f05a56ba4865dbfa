"""The shipped Fashion-MNIST defaults load from package files and do what the model card says."""

import json
from importlib import resources

import pytest
import torch

import pursamere_fast
from pursamere_fast import data
from pursamere_fast.nets import ConvScoreNet, SmallCNN, UNetScoreNet
from pursamere_fast.pretrained import (
    CONFIG_FILE,
    RELEASES,
    TEST_SUBSET_FILE,
    fashion_mnist,
    fashion_mnist_v1,
    recommended_config_dict,
)

# Measured on the shipped files (MODEL_CARD.md) on these 1,000 images: 89.7% ("protocol") and
# 91.0% ("v1"). The margin only absorbs platform float differences; the files are fixed.
ACCURACY_1000_BOUND = 0.88
SCORE_TYPE = {"protocol": UNetScoreNet, "v1": ConvScoreNet}
# (rho in 1/255, SAM radius): the protocol's held-out selection, and v1's sweep.
CONFIG = {"protocol": (12, 0.0), "v1": (16, 0.0)}


pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module", params=list(RELEASES))
def defaults(request):
    return fashion_mnist(release=request.param), request.param


def test_files_are_in_the_package_and_small():
    root = resources.files("pursamere_fast.pretrained")
    files = [f for release in RELEASES.values() for f in release]
    for name in files + [TEST_SUBSET_FILE, "MODEL_CARD.md", "LICENSE-fashion-mnist.txt"]:
        assert root.joinpath(name).is_file(), name
    total = sum(len(root.joinpath(n).read_bytes()) for n in files if n.endswith(".safetensors"))
    assert total < 20 * 2**20
    assert "Copyright (c) 2017 Zalando SE" in root.joinpath("LICENSE-fashion-mnist.txt").read_text()
    for _, _, config in RELEASES.values():
        assert json.loads(root.joinpath(config).read_text())["status"] == "validated"


def test_loads_without_any_dataset(monkeypatch, tmp_path):
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / "none"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    d = fashion_mnist()
    assert d.images.shape == (1000, 1, 28, 28)


def test_default_release_and_the_v1_shorthand():
    assert RELEASES["protocol"][2] == CONFIG_FILE
    assert fashion_mnist().config == fashion_mnist(release="protocol").config
    v1 = fashion_mnist_v1()
    assert isinstance(v1.score, ConvScoreNet) and v1.config == fashion_mnist(release="v1").config
    with pytest.raises(ValueError, match="release must be one of 'protocol', 'v1', got 'v2'"):
        fashion_mnist(release="v2")


def test_protocol_models_never_saw_the_held_out_images():
    from pursamere_fast.protocol import check_held_out

    root = resources.files("pursamere_fast.pretrained")
    for name in RELEASES["protocol"][:2]:
        with resources.as_file(root.joinpath(name)) as path:
            meta = json.loads(_metadata(path)["training"])
            assert meta["args"]["holdout"] == 5000, name
    with resources.as_file(root.joinpath(RELEASES["protocol"][0])) as path:
        check_held_out(path, "fashion-mnist", 5000)
    with resources.as_file(root.joinpath(RELEASES["protocol"][1])) as path:
        assert json.loads(_metadata(path)["training"])["purified_augmentation"] is True


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_shapes_dtypes_and_types(defaults):
    d, release = defaults
    assert d.images.shape == (1000, 1, 28, 28) and d.images.dtype == torch.float32
    assert d.images.min() >= 0 and d.images.max() <= 1
    # uint8 on disk: every value is a multiple of 1/255.
    assert torch.equal(torch.round(d.images * 255) / 255, d.images)
    assert d.labels.shape == (1000,) and d.labels.dtype == torch.int64
    assert torch.equal(torch.bincount(d.labels, minlength=10) > 80, torch.ones(10, dtype=torch.bool))
    assert isinstance(d.score, SCORE_TYPE[release]) and isinstance(d.classifier, SmallCNN)
    assert not d.score.training and not d.classifier.training
    assert not any(p.requires_grad for p in d.classifier.parameters())


def test_config(defaults):
    d, release = defaults
    cfg = d.config
    assert isinstance(cfg, pursamere_fast.PurifyConfig)
    assert cfg == pursamere_fast.PurifyConfig(**recommended_config_dict(release))
    rho, sam_radius = CONFIG[release]
    assert cfg.norm == "linf" and cfg.rho == pytest.approx(rho / 255)
    assert cfg.num_steps == 10 and cfg.n_samples == 2 and cfg.sam_radius == sam_radius


def test_classifier_accuracy_on_shipped_images(defaults):
    defaults, _ = defaults
    with torch.no_grad():
        pred = defaults.classifier(defaults.images).argmax(1)
    assert (pred == defaults.labels).float().mean().item() >= ACCURACY_1000_BOUND


@pytest.mark.parametrize("sigma", [0.1, 0.25])
def test_score_denoises_better_than_identity(defaults, sigma):
    defaults, _ = defaults
    x = defaults.images[:16]
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    y = x + sigma * z
    with torch.no_grad():
        x_hat = y + sigma ** 2 * defaults.score(y, torch.full((16,), sigma))
    # Measured ratio noisy/Tweedie MSE on 1,000 test images: see MODEL_CARD.md.
    assert (x_hat - x).pow(2).mean() < 0.5 * (y - x).pow(2).mean()


def test_recommended_config_purifies_clean_images_without_harm(defaults):
    defaults, _ = defaults
    x, y = defaults.images[:8], defaults.labels[:8]
    x_pur = pursamere_fast.purify(x, defaults.score, defaults.config, backend="torch")
    assert x_pur.shape == x.shape
    assert (x_pur - x).abs().max() <= defaults.config.rho + 1e-6
    with torch.no_grad():
        clean = defaults.classifier(x).argmax(1)
        purified = defaults.classifier(x_pur).argmax(1)
    assert (purified == y).sum() >= (clean == y).sum() - 1
