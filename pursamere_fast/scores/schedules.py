"""VP noise schedules and their sigma <-> t maps, written once for every adapter (SPEC 11).

A VP model at time t sees x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps. Divided by sqrt(ab_t)
this is x_0 + sigma_t eps with sigma_t = sqrt((1 - ab_t) / ab_t): the VE level of time t, in
the model's own data space. A schedule maps that level to the model's time and back; the
adapters of `adapters.py` scale this library's [0, 1]-space sigma into the model's space
first (times the width of its data range).

- `DiscreteVPSchedule`: `alphas_cumprod[t]` on t = 0..T-1 (diffusers' DDPM/DDIM family, any
  beta schedule). t(sigma) interpolates log sigma_t piecewise-linearly over the integer grid
  (equivalently log(ab / (1 - ab)), the log-SNR), "nearest" rounds it.
- `ContinuousVPSchedule`: score_sde's VP SDE, beta(t) = beta_min + t (beta_max - beta_min),
  ab(t) = exp(-t^2 (beta_max - beta_min) / 2 - t beta_min), t in (0, 1]; t(sigma) in closed form.

Both work on tensors on any device without a host sync, except the range check, which is
skipped while a CUDA graph is being captured.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import checks

__all__ = ["DiscreteVPSchedule", "ContinuousVPSchedule", "TIMESTEPS"]

TIMESTEPS = ("continuous", "nearest")


def _unchecked(t: torch.Tensor) -> bool:
    # No values to check on the meta device (FLOP counting), and no host sync during capture.
    return t.is_meta or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_range(t: torch.Tensor, low: float, high: float, sigma: torch.Tensor, scale: float,
                 sigma_range: tuple[float, float], what: str) -> None:
    """Raise when a time t is outside [low, high], naming the levels in the caller's space: the
    model-space sigma and its range divided by `scale` (the adapters' data-range width)."""
    if _unchecked(t):
        return
    if not bool(((t >= low) & (t <= high)).all()):
        s = sigma.detach() / scale
        raise ValueError(f"sigma must lie in [{sigma_range[0] / scale:.6g}, {sigma_range[1] / scale:.6g}] ({what}), "
                         f"got values in [{float(s.min()):.6g}, {float(s.max()):.6g}]")


class DiscreteVPSchedule(nn.Module):
    """A discrete VP schedule `alphas_cumprod` (T,) on t = 0..T-1, with its sigma <-> t map.

    Args:
        alphas_cumprod: 1-D, strictly decreasing, in [0, 1] (a tensor or sequence). A last
            entry of 0 (zero terminal SNR, diffusers' `rescale_betas_zero_snr`) is infinite
            noise: every sigma above the last finite level then maps into the last interval.
        timesteps: "continuous" (real t, the default: for models whose time embedding takes a
            real t, as diffusers' and score_sde's do) or "nearest" (t rounded to an integer).

    Raises:
        ValueError: on a bad argument (named in the message).
    """

    def __init__(self, alphas_cumprod, *, timesteps: str = "continuous"):
        super().__init__()
        try:
            ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).clone()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"alphas_cumprod must be a 1-D tensor or sequence of floats, got "
                             f"{type(alphas_cumprod).__name__}") from None
        if ac.dim() != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(ac.shape)}")
        if not bool(torch.isfinite(ac).all()) or not bool(((ac >= 0) & (ac <= 1)).all()):
            raise ValueError("alphas_cumprod must lie in [0, 1], got values in "
                             f"[{float(ac.min()):.6g}, {float(ac.max()):.6g}]")
        if not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.timesteps = checks.choice("timesteps", timesteps, TIMESTEPS)
        self.register_buffer("alphas_cumprod", ac, persistent=False)
        # log sigma_t, increasing in t; ab = 1 gives -inf and ab = 0 gives +inf, which the
        # interpolation never picks for a positive, finite sigma.
        self.register_buffer("log_sigmas", 0.5 * torch.log((1 - ac) / ac), persistent=False)

    @property
    def T(self) -> int:
        return self.alphas_cumprod.numel()

    def sigma_range(self) -> tuple[float, float]:
        """The smallest and largest model-space sigma of the grid (t = 0 and t = T - 1)."""
        s = self.log_sigmas.exp()
        return float(s[0]), float(s[-1])

    def sigma_to_t(self, sigma: torch.Tensor, *, scale: float = 1.0, check: bool = True) -> torch.Tensor:
        """The time of each model-space level sigma: real t in [0, T - 1] (float64), or its
        rounding for "nearest" (int64).

        Args:
            sigma: model-space levels (M,).
            scale: errors show sigma / scale (an adapter's [0, 1]-space levels).
            check: raise for a sigma outside the schedule's range (one host sync).

        Raises:
            ValueError: a sigma outside the schedule's range (when `check`).
        """
        log_grid = self.log_sigmas.to(sigma.device)
        q = sigma.to(torch.float64).log()
        hi = torch.searchsorted(log_grid, q).clamp(1, self.T - 1)
        lo = hi - 1
        w = (q - log_grid[lo]) / (log_grid[hi] - log_grid[lo])
        t = lo.to(torch.float64) + w
        if check:
            # 1e-9: rounding of the float64 interpolation at the grid's ends.
            _check_range(t, -1e-9, self.T - 1 + 1e-9, sigma, scale, self.sigma_range(), "the model's schedule")
        t = t.clamp(0, self.T - 1)
        return t.round().long() if self.timesteps == "nearest" else t

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The model-space level of each time t (integer: the grid's; real: the inverse of the
        interpolation of `sigma_to_t`), float64."""
        log_grid = self.log_sigmas.to(t.device)
        if not t.is_floating_point():
            return log_grid[t].exp()
        tt = t.to(torch.float64).clamp(0, self.T - 1)
        lo = tt.floor().long().clamp(0, self.T - 2)
        w = tt - lo
        return torch.lerp(log_grid[lo], log_grid[lo + 1], w).exp()

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ab at time t (integer: the grid's; real: 1 / (1 + t_to_sigma(t)^2)), float64."""
        if not t.is_floating_point():
            return self.alphas_cumprod.to(t.device)[t]
        return 1 / (1 + self.t_to_sigma(t) ** 2)

    def extra_repr(self) -> str:
        return f"T={self.T}, timesteps={self.timesteps!r}"


class ContinuousVPSchedule(nn.Module):
    """score_sde's continuous VP schedule (module docstring), t in (0, 1].

    Args:
        beta_min, beta_max: 0 < beta_min <= beta_max.

    Raises:
        ValueError: on a bad argument.
    """

    def __init__(self, *, beta_min: float = 0.1, beta_max: float = 20.0):
        super().__init__()
        self.beta_min = checks.real("beta_min", beta_min, positive=True)
        self.beta_max = checks.real("beta_max", beta_max, self.beta_min)

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        d = self.beta_max - self.beta_min
        return -0.5 * t**2 * d - t * self.beta_min

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self.log_alpha_bar(t).exp()

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sqrt((1 - ab(t)) / ab(t)) = sqrt(expm1(-log ab(t))), without cancellation at small t."""
        return torch.expm1(-self.log_alpha_bar(t)).sqrt()

    def sigma_range(self) -> tuple[float, float]:
        return 0.0, math.sqrt(math.expm1(0.5 * (self.beta_max - self.beta_min) + self.beta_min))

    def sigma_to_t(self, sigma: torch.Tensor, *, scale: float = 1.0, check: bool = True) -> torch.Tensor:
        """The t in (0, 1] with ab(t) = 1 / (1 + sigma^2), float64 (`scale`, `check`: as
        `DiscreteVPSchedule.sigma_to_t`).

        t^2 d / 2 + t beta_min = log(1 + sigma^2) =: L has the root
        t = 2 L / (beta_min + sqrt(beta_min^2 + 2 d L)) (the form without cancellation).

        Raises:
            ValueError: sigma above the level of t = 1 (when `check`).
        """
        d = self.beta_max - self.beta_min
        L = torch.log1p(sigma.to(torch.float64) ** 2)
        t = 2 * L / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * L))
        if check:
            _check_range(t, 0.0, 1.0 + 1e-12, sigma, scale, self.sigma_range(), "the model's levels of t in (0, 1]")
        return t

    def extra_repr(self) -> str:
        return f"beta_min={self.beta_min}, beta_max={self.beta_max}"
