"""Trained Fashion-MNIST defaults shipped inside the package (see MODEL_CARD.md here).

    from pursamere_fast.pretrained import fashion_mnist
    d = fashion_mnist()
    x_pur = purify(d.images[:8], d.score, d.config)
    acc = (d.classifier(x_pur).argmax(1) == d.labels[:8]).float().mean()

Two releases:
- "protocol" (the default): the models of the paper's protocol (issue 13): a U-Net score model
  and a classifier trained with purified augmentation (the paper's eq. 17), both without the
  last 5,000 training images, on which the config was chosen.
- "v1": the first defaults (a 47k-parameter conv score model, a classifier trained on clean
  images, a config chosen on images both had trained on), which the results under
  results/fmnist/ and docs/results.md measured; kept so that those runs reproduce and resume.
  `fashion_mnist_v1()` loads it where only a name fits (the "module:factory.field" specs of
  `pursamere-fast evaluate`).

Everything is read from files of this package with safetensors (no pickle, no download).
The data and the weights derive from Fashion-MNIST (MIT, Copyright (c) 2017 Zalando SE;
LICENSE-fashion-mnist.txt).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, NamedTuple

import torch
from torch import nn

TEST_SUBSET_FILE = "fashion_mnist_test1000.safetensors"
# release -> (score, classifier, config) files.
RELEASES = {
    "protocol": ("fashion_mnist_score.safetensors", "fashion_mnist_classifier.safetensors",
                 "fashion_mnist_config.json"),
    "v1": ("fashion_mnist_v1_score.safetensors", "fashion_mnist_v1_classifier.safetensors",
           "fashion_mnist_v1_config.json"),
}
SCORE_FILE, CLASSIFIER_FILE, CONFIG_FILE = RELEASES["protocol"]


class FashionMNISTDefaults(NamedTuple):
    """The shipped Fashion-MNIST models, test images and recommended purification config.

    Attributes:
        score: score(y, sigma) for 28x28x1 images in [0, 1] (EMA weights): UNetScoreNet in the
            "protocol" release, ConvScoreNet in "v1".
        classifier: SmallCNN, logits over the 10 Fashion-MNIST classes.
        images: float32 (1000, 1, 28, 28) in [0, 1], the first 1,000 test images.
        labels: int64 (1000,).
        config: recommended PurifyConfig (chosen on validation images, see MODEL_CARD.md).
    """

    score: nn.Module
    classifier: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    config: Any


def _files(release: str) -> tuple[str, str, str]:
    if release not in RELEASES:
        raise ValueError(f"release must be one of {', '.join(map(repr, RELEASES))}, got {release!r}")
    return RELEASES[release]


def _load_net(name: str, device) -> nn.Module:
    from pursamere_fast.nets import load_net

    with resources.as_file(resources.files(__name__).joinpath(name)) as path:
        model = load_net(path, device)
    # Shipped for inference: frozen so that attacks through them accumulate no .grad.
    return model.requires_grad_(False)


def recommended_config_dict(release: str = "protocol") -> dict:
    """The recommended PurifyConfig fields of a release, as stored in the package JSON."""
    text = resources.files(__name__).joinpath(_files(release)[2]).read_text()
    return dict(json.loads(text)["purify_config"])


def load_test_subset(device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The first 1,000 Fashion-MNIST test images (float32 in [0, 1]) and labels (int64)."""
    from safetensors.torch import load_file

    with resources.as_file(resources.files(__name__).joinpath(TEST_SUBSET_FILE)) as path:
        data = load_file(str(path))
    images = data["images"].to(torch.float32).div_(255.0)
    return images.to(device), data["labels"].to(device)


def fashion_mnist(device: str | torch.device = "cpu", release: str = "protocol") -> FashionMNISTDefaults:
    """Load the shipped Fashion-MNIST defaults.

    Args:
        device: where to put the models and images.
        release: "protocol" (the default) or "v1" (see the module docstring).

    Returns:
        FashionMNISTDefaults; the models are in eval mode with frozen parameters.

    Raises:
        ValueError: unknown release.
    """
    from pursamere_fast import PurifyConfig

    score_file, classifier_file, _ = _files(release)
    images, labels = load_test_subset(device)
    config_fields = recommended_config_dict(release)
    config_fields["sigmas"] = tuple(config_fields["sigmas"])
    return FashionMNISTDefaults(score=_load_net(score_file, device), classifier=_load_net(classifier_file, device),
                                images=images, labels=labels, config=PurifyConfig(**config_fields))


def fashion_mnist_v1(device: str | torch.device = "cpu") -> FashionMNISTDefaults:
    """`fashion_mnist(device, release="v1")`: the first defaults, which results/fmnist/ measured."""
    return fashion_mnist(device, release="v1")


__all__ = ["FashionMNISTDefaults", "RELEASES", "fashion_mnist", "fashion_mnist_v1", "load_test_subset",
           "recommended_config_dict"]
