"""The score protocol `score(y, sigma)` and adapters that turn other model kinds into it.

A score is any callable `score(y, sigma) -> Tensor` with y of shape (M, C, H, W) and sigma
a float tensor of shape (M,) (one noise level per row), returning grad_y log p_sigma(y) of
y's shape. `purify` and `Purifier` take any such callable.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .. import checks

__all__ = ["ScoreFn", "NoisePredictionScore", "LabelIndexedScore"]


@runtime_checkable
class ScoreFn(Protocol):
    """s(y, sigma) ~ grad_y log p_sigma(y): y (M, C, H, W), sigma (M,) -> (M, C, H, W)."""

    def __call__(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


def _check_sigma(y: torch.Tensor, sigma: torch.Tensor) -> None:
    if y.dim() != 4:
        raise ValueError(f"y must have shape (M, C, H, W), got {tuple(y.shape)}")
    if sigma.shape != (y.shape[0],):
        raise ValueError(f"sigma must have shape ({y.shape[0]},), got {tuple(sigma.shape)}")


class NoisePredictionScore(nn.Module):
    """Score of a noise-prediction (epsilon) model: s(y, sigma) = -model(y, sigma) / sigma.

    For y = x + sigma * eps, the model predicts eps, and Tweedie's formula gives
    grad log p_sigma(y) = -E[eps | y] / sigma.

    Args:
        model: callable `model(y, sigma) -> eps_hat` with the shapes of the protocol.

    Raises:
        ValueError: model is not callable.
    """

    def __init__(self, model):
        super().__init__()
        checks.function("model", model)
        self.model = model

    def forward(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        _check_sigma(y, sigma)
        return -self.model(y, sigma) / sigma.view(-1, 1, 1, 1)


class LabelIndexedScore(nn.Module):
    """Continuous-sigma score from an NCSN-style `model(y, labels)` trained on a sigma ladder.

    Each row takes the ladder level nearest to its sigma in log-space (the ladders are
    geometric, so this is the nearest level in ratio terms; a tie goes to the lower index,
    i.e. the larger sigma on a decreasing ladder), then the output, a score at
    sigmas[label], is rescaled by sigmas[label] / sigma. NCSN outputs are body / sigmas[label],
    so the result is body / sigma: exact for a noise-unconditional body (NCSNv2), the usual
    1/sigma approximation for a label-conditional one (NCSN v1). At a sigma on the ladder it
    equals model(y, labels) up to rounding.

    Args:
        model: callable `model(y, labels) -> score` with labels int64 of shape (M,).
        sigmas: the training ladder, 1-D, finite, positive (tensor or sequence of floats).

    Raises:
        ValueError: model is not callable, or sigmas is empty, not 1-D, not finite or not
            positive.
    """

    def __init__(self, model, sigmas):
        super().__init__()
        checks.function("model", model)
        try:
            ladder = torch.as_tensor(sigmas).detach().clone()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"sigmas must be a 1-D tensor or sequence of floats, got {sigmas!r}") from None
        if ladder.dim() != 1 or ladder.numel() == 0 or ladder.is_complex() or ladder.dtype == torch.bool:
            raise ValueError(f"sigmas must be a non-empty 1-D real tensor, got {sigmas!r}")
        if not ladder.is_floating_point():
            ladder = ladder.to(torch.get_default_dtype())
        if not bool(torch.isfinite(ladder).all()) or not bool((ladder > 0).all()):
            raise ValueError(f"sigmas must be finite and positive, got {sigmas!r}")
        self.model = model
        self.register_buffer("sigmas", ladder)
        self.register_buffer("log_sigmas", ladder.log())

    def labels(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the ladder level nearest to each sigma in log-space.

        Args:
            sigma: positive noise levels, shape (M,).

        Returns:
            int64 tensor of shape (M,).
        """
        distance = (sigma.to(self.log_sigmas.dtype).log()[:, None] - self.log_sigmas[None, :]).abs()
        return distance.argmin(dim=1)

    def forward(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        _check_sigma(y, sigma)
        labels = self.labels(sigma)
        scale = self.sigmas[labels].to(sigma.dtype) / sigma
        return self.model(y, labels) * scale.view(-1, 1, 1, 1)
