"""Tiny synthetic data and models for tests, smoke runs and CLI demos (seconds on one CPU core).

Every factory is deterministic given its seed and leaves the global RNG untouched, so
separate processes (resumed runs, torchrun ranks) build the same models.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pursamere_fast.nets import ConvScoreNet, SmallCNN


def synthetic_data(n: int = 512, *, channels: int = 1, image_size: int = 8, num_classes: int = 4,
                   noise: float = 0.15, seed: int = 0, prototype_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes in [0.2, 0.8] plus Gaussian noise, clamped to [0, 1].

    Args:
        n: number of images.
        channels, image_size: image shape (channels, image_size, image_size).
        num_classes: classes; the labels cycle 0..num_classes-1.
        noise: std of the per-image noise.
        seed: seed of the per-image noise (a different seed gives a fresh split of the same task).
        prototype_seed: seed of the class prototypes (the task).

    Returns:
        (x, y): float32 images (n, C, S, S) in [0, 1] and int64 labels (n,).
    """
    if n < 1 or num_classes < 2 or image_size < 4 or channels < 1:
        raise ValueError(f"need n >= 1, num_classes >= 2, image_size >= 4, channels >= 1; got "
                         f"n={n}, num_classes={num_classes}, image_size={image_size}, channels={channels}")
    protos = 0.2 + 0.6 * torch.rand((num_classes, channels, image_size, image_size),
                                    generator=torch.Generator("cpu").manual_seed(prototype_seed))
    gen = torch.Generator("cpu").manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = protos[y] + noise * torch.randn((n, channels, image_size, image_size), generator=gen)
    return x.clamp(0, 1), y


def _init(module_factory, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module_factory()


def make_classifier(*, channels: int = 1, image_size: int = 8, num_classes: int = 4, width: int = 8,
                    seed: int = 0, train_steps: int = 0, checkpoint: str | None = None) -> SmallCNN:
    """A SmallCNN in eval mode: seeded init, then `train_steps` Adam steps on 512 images of
    `synthetic_data` (noise seed 12345, a split apart from the default seeds), or weights
    loaded from a state-dict file (weights_only)."""
    model = _init(lambda: SmallCNN(channels, num_classes, width, image_size), seed)
    if train_steps > 0:
        x, y = synthetic_data(512, channels=channels, image_size=image_size, num_classes=num_classes, seed=12345)
        train_classifier(model, x, y, steps=train_steps, seed=seed)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()


def make_score(*, channels: int = 1, width: int = 8, depth: int = 2, seed: int = 0) -> ConvScoreNet:
    """A randomly initialised ConvScoreNet in eval mode with frozen parameters."""
    model = _init(lambda: ConvScoreNet(channels, width, depth), seed)
    return model.eval().requires_grad_(False)


def train_classifier(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 150,
                     lr: float = 1e-2, batch_size: int = 64, seed: int = 0) -> torch.nn.Module:
    """Adam on the cross-entropy for `steps` minibatches drawn by a seeded generator; returns model in eval mode."""
    gen = torch.Generator("cpu").manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()
