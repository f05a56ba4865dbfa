"""Trained Fashion-MNIST defaults shipped inside the package (see MODEL_CARD.md here).

    from pursamere_fast.pretrained import fashion_mnist
    d = fashion_mnist()
    x_pur = purify(d.images[:8], d.score, d.config)
    acc = (d.classifier(x_pur).argmax(1) == d.labels[:8]).float().mean()

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

SCORE_FILE = "fashion_mnist_score.safetensors"
CLASSIFIER_FILE = "fashion_mnist_classifier.safetensors"
TEST_SUBSET_FILE = "fashion_mnist_test1000.safetensors"
CONFIG_FILE = "fashion_mnist_config.json"


class FashionMNISTDefaults(NamedTuple):
    """The shipped Fashion-MNIST models, test images and recommended purification config.

    Attributes:
        score: ConvScoreNet, score(y, sigma) for 28x28x1 images in [0, 1] (EMA weights).
        classifier: SmallCNN, logits over the 10 Fashion-MNIST classes.
        images: float32 (1000, 1, 28, 28) in [0, 1], the first 1,000 test images.
        labels: int64 (1000,).
        config: recommended PurifyConfig (chosen on a validation split, see MODEL_CARD.md).
    """

    score: nn.Module
    classifier: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    config: Any


def _load_net(name: str, device) -> nn.Module:
    from pursamere_fast.nets import load_net

    with resources.as_file(resources.files(__name__).joinpath(name)) as path:
        model = load_net(path, device)
    # Shipped for inference: frozen so that attacks through them accumulate no .grad.
    return model.requires_grad_(False)


def recommended_config_dict() -> dict:
    """The recommended PurifyConfig fields for Fashion-MNIST, as stored in the package JSON."""
    text = resources.files(__name__).joinpath(CONFIG_FILE).read_text()
    return dict(json.loads(text)["purify_config"])


def load_test_subset(device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The first 1,000 Fashion-MNIST test images (float32 in [0, 1]) and labels (int64)."""
    from safetensors.torch import load_file

    with resources.as_file(resources.files(__name__).joinpath(TEST_SUBSET_FILE)) as path:
        data = load_file(str(path))
    images = data["images"].to(torch.float32).div_(255.0)
    return images.to(device), data["labels"].to(device)


def fashion_mnist(device: str | torch.device = "cpu") -> FashionMNISTDefaults:
    """Load the shipped Fashion-MNIST defaults.

    Args:
        device: where to put the models and images.

    Returns:
        FashionMNISTDefaults; the models are in eval mode with frozen parameters.
    """
    from pursamere_fast import PurifyConfig

    images, labels = load_test_subset(device)
    config_fields = recommended_config_dict()
    config_fields["sigmas"] = tuple(config_fields["sigmas"])
    return FashionMNISTDefaults(score=_load_net(SCORE_FILE, device), classifier=_load_net(CLASSIFIER_FILE, device),
                                images=images, labels=labels, config=PurifyConfig(**config_fields))


__all__ = ["FashionMNISTDefaults", "fashion_mnist", "load_test_subset", "recommended_config_dict"]
