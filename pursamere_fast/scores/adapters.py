"""The score protocol `score(y, sigma)` and adapters that turn other model kinds into it.

A score is any callable `score(y, sigma) -> Tensor` with y of shape (M, C, H, W) and sigma
a float tensor of shape (M,) (one noise level per row), returning grad_y log p_sigma(y) of
y's shape. `purify` and `Purifier` take any such callable.

The other way, for VP diffusion purifiers (`HeteroPurifier`): `VPNoisePredictor` turns a score
into a noise predictor eps_hat(xb_t, t) on the schedule of `vp_alpha_bar`, and
`NativeNoisePredictor` marks a model that predicts the noise itself.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .. import checks

__all__ = ["ScoreFn", "NoisePredictionScore", "LabelIndexedScore", "vp_alpha_bar", "NoisePredictor",
           "VPNoisePredictor", "NativeNoisePredictor"]


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


def vp_alpha_bar(T: int = 1000, beta_min: float = 1e-4, beta_max: float = 0.02) -> torch.Tensor:
    """The VP (DDPM) schedule alpha_bar_t = prod_{s <= t} (1 - beta_s), linear betas (SPEC 8).

    Timesteps are 1-based: beta_1 = beta_min, ..., beta_T = beta_max, and t = 0 is the clean
    image, so the result has T + 1 entries and is indexed by t directly (entry 0 is 1.0).
    A model trained with DDPM's 0-based indices (index i = our t = i + 1) plugs in through
    `NativeNoisePredictor(model, zero_based=True)`.

    Args:
        T: number of diffusion steps, >= 1.
        beta_min, beta_max: first and last beta, 0 < beta_min <= beta_max < 1.

    Returns:
        float64 tensor (T + 1,) on the CPU, strictly decreasing from 1.0.

    Raises:
        ValueError: a bad argument (named in the message).
    """
    T = checks.integer("T", T, 1)
    beta_min = checks.real("beta_min", beta_min, positive=True)
    beta_max = checks.real("beta_max", beta_max, beta_min)
    if beta_max >= 1:
        raise ValueError(f"beta_max must be < 1, got {beta_max!r}")
    betas = torch.linspace(beta_min, beta_max, T, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


class NoisePredictor(nn.Module):
    """Base class of noise predictors eps_hat(xb_t, t) for VP diffusion on [-1, 1] images.

    `forward(xb_t, t)`: xb_t (M, C, H, W), the noised image sqrt(alpha_bar_t) xb +
    sqrt(1 - alpha_bar_t) eps of xb = 2x - 1; t int64 (M,) in 1..T (`vp_alpha_bar`'s
    convention); returns eps_hat of xb_t's shape. `HeteroPurifier` uses an instance of this
    class as it is and wraps anything else as a VE score (`VPNoisePredictor`).
    """


class VPNoisePredictor(NoisePredictor):
    """The noise predictor of a VE score model s(y, sigma) on [0, 1] images (SPEC 8).

    xb_t / sqrt(alpha_bar_t) = xb + sqrt((1 - alpha_bar_t) / alpha_bar_t) eps, so
    y = (xb_t / sqrt(alpha_bar_t) + 1) / 2 = x + sigma' eps with
    sigma' = 0.5 * sqrt((1 - alpha_bar_t) / alpha_bar_t): a VE-noised [0, 1] image. Tweedie
    gives E[eps | y] = -sigma' * grad_y log p_sigma'(y), and eps is the same variable in both
    spaces, so eps_hat(xb_t, t) = -sigma' * s(y, sigma').

    Args:
        score: callable score(y, sigma), y (M, C, H, W) in [0, 1]-space, sigma (M,);
            registered as a submodule when it is an nn.Module.
        T, beta_min, beta_max: the schedule (`vp_alpha_bar`).

    Attributes:
        alpha_bar: float64 buffer (T + 1,), not saved in the state dict (it is a function of
            T, beta_min, beta_max); `.to(dtype)` of the module rounds it like any buffer.

    Raises:
        ValueError: score is not callable, or a bad schedule argument.
    """

    def __init__(self, score, *, T: int = 1000, beta_min: float = 1e-4, beta_max: float = 0.02):
        super().__init__()
        self.score = checks.function("score", score)
        # On the score's device, so that the purifier needs no copy per call (a sync on CUDA);
        # `.to(device)` of this module moves both together afterwards.
        tensors = [*score.parameters(), *score.buffers()] if isinstance(score, nn.Module) else []
        alpha_bar = vp_alpha_bar(T, beta_min, beta_max).to(tensors[0].device if tensors else "cpu")
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)
        self.T, self.beta_min, self.beta_max = T, beta_min, beta_max

    def forward(self, xb_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_hat for xb_t (M, C, H, W) at timesteps t (int64 (M,), values in 1..T, unchecked:
        checking them would sync the device every call; t = 0 is no noise level and gives inf)."""
        _check_timesteps(xb_t, t)
        ab = self.alpha_bar[t]
        sigma = (0.5 * ((1 - ab) / ab).sqrt()).to(xb_t.dtype)
        inv_sqrt_ab = ab.rsqrt().to(xb_t.dtype).view(-1, 1, 1, 1)
        y = (xb_t * inv_sqrt_ab + 1) / 2
        s = self.score(y, sigma)
        if s.shape != y.shape:
            raise ValueError(f"score returned shape {tuple(s.shape)}, expected {tuple(y.shape)}")
        return -sigma.view(-1, 1, 1, 1) * s

    def extra_repr(self) -> str:
        return f"T={self.T}, beta_min={self.beta_min}, beta_max={self.beta_max}"


class NativeNoisePredictor(NoisePredictor):
    """A model that predicts the VP noise itself, eps_hat = model(xb_t, t), used as it is.

    Args:
        model: callable model(xb_t, t) with xb_t (M, C, H, W) in [-1, 1]-space and t int64 (M,).
        zero_based: the model was trained with DDPM's 0-based timestep indices (the DDPM,
            score_sde and guided-diffusion code, where index i means alpha_bar_(i+1) here):
            it is called with t - 1.

    Raises:
        ValueError: model is not callable, or zero_based is not a bool.
    """

    def __init__(self, model, *, zero_based: bool = False):
        super().__init__()
        self.model = checks.function("model", model)
        self.zero_based = checks.flag("zero_based", zero_based)

    def forward(self, xb_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_timesteps(xb_t, t)
        eps = self.model(xb_t, t - 1 if self.zero_based else t)
        if eps.shape != xb_t.shape:
            raise ValueError(f"model returned shape {tuple(eps.shape)}, expected {tuple(xb_t.shape)}")
        return eps

    def extra_repr(self) -> str:
        return f"zero_based={self.zero_based}"


def _check_timesteps(xb_t: torch.Tensor, t: torch.Tensor) -> None:
    if xb_t.dim() != 4:
        raise ValueError(f"xb_t must have shape (M, C, H, W), got {tuple(xb_t.shape)}")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (xb_t.shape[0],):
        raise ValueError(f"t must be an int64 tensor of shape ({xb_t.shape[0]},), got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
