"""Baseline purifiers evaluated under the same harness: ADP-style score ascent.

ADP (Yoon, Hwang, Lee, ICML 2021, "Adversarial purification with score-based generative
models"): inject Gaussian noise, then take a few deterministic score-ascent steps
x <- x + alpha * sigma^2 * s(x, sigma). With alpha = 1 one step is Tweedie's denoiser at
noise level sigma. Our variant draws one noise image (C, H, W) from a seeded CPU generator
and shares it across the batch, as PurSAMERE does, so the purifier is deterministic given
seed and batch invariant; `FreshNoisePurifier` turns it into the stochastic defence.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

GRAD_MODES = ("none", "bpda", "full")


class ADPPurifier(nn.Module):
    """ADP-style purifier: noise injection then `steps` score-ascent steps at one sigma.

    Args:
        score: callable score(y, sigma) with y (M, C, H, W) and sigma (M,).
        sigma: noise level of the score, > 0.
        noise_std: std of the injected noise, >= 0.
        steps: score-ascent steps, >= 1.
        alpha: step multiplier (x += alpha * sigma^2 * s), > 0.
        seed: seed of the injected noise.
        grad_mode: "none" (no graph), "bpda" (identity backward) or "full" (backprop
            through the steps: a single backward through the score per step).

    Raises:
        ValueError: on a bad argument (named in the message).
    """

    def __init__(self, score: Callable, *, sigma: float = 0.25, noise_std: float = 0.25, steps: int = 5,
                 alpha: float = 1.0, seed: int = 0, grad_mode: str = "none"):
        super().__init__()
        if not callable(score):
            raise ValueError(f"score must be callable, got {type(score).__name__}")
        for name, v, pos in (("sigma", sigma, True), ("noise_std", noise_std, False), ("alpha", alpha, True)):
            bad = not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
            if bad or v < 0 or (pos and v == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if pos else '>= 0'}, got {v!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        self.score = score
        self.sigma, self.noise_std, self.steps, self.alpha = float(sigma), float(noise_std), steps, float(alpha)
        self.seed, self.grad_mode = seed, grad_mode

    def _purify(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape[1:], generator=torch.Generator("cpu").manual_seed(self.seed),
                            dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        y = (x + self.noise_std * noise).clamp(0, 1)
        sig = torch.full((x.shape[0],), self.sigma, device=x.device, dtype=x.dtype)
        for _ in range(self.steps):
            s = self.score(y, sig)
            if s.shape != y.shape:
                raise ValueError(f"score returned shape {tuple(s.shape)}, expected {tuple(y.shape)}")
            y = y + self.alpha * self.sigma**2 * s
        return y.clamp(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_mode == "full":
            return self._purify(x)
        with torch.no_grad():
            out = self._purify(x.detach())
        if self.grad_mode == "bpda":
            return out + (x - x.detach())
        return out
