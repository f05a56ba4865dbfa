"""ADP-style score ascent, a baseline purifier evaluated under the same harness as PurSAMERE.

ADP (Yoon, Hwang, Lee, ICML 2021, "Adversarial purification with score-based generative
models"): inject Gaussian noise, then take a few deterministic score-ascent steps
x <- x + alpha * sigma^2 * s(x, sigma). With alpha = 1 one step is Tweedie's denoiser at
noise level sigma. Our variant draws one noise image (C, H, W) from a seeded CPU generator
and shares it across the batch, as PurSAMERE does, so the purifier is deterministic given
seed and batch invariant; `pursamere_fast.attacks.FreshNoisePurifier` turns it into the stochastic
defence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import checks
from ..purifier import GRAD_MODES, check_output_finite, purifier_forward, score_call
from ..purify import check_score


class ADPPurifier(nn.Module):
    """ADP-style purifier: noise injection then `steps` score-ascent steps at one sigma.

    Args:
        score: callable score(y, sigma) with y (M, C, H, W) and sigma (M,).
        sigma: noise level of the score, > 0.
        noise_std: std of the injected noise, >= 0.
        steps: score-ascent steps, >= 1.
        alpha: step multiplier (x += alpha * sigma^2 * s), > 0.
        seed: seed of the injected noise.
        grad_mode: one of `pursamere_fast.purifier.GRAD_MODES`: "none" (no graph), "bpda"
            (identity backward), "full" (backprop through the steps: a single backward
            through the score per step), "full_st" (the same as "full": ADP has no Adam
            normaliser to hold constant, and the name is accepted so that every purifier
            takes the same grad modes), "full_st_proj" (as "full", with the two [0, 1]
            clamps passed straight through). Every mode has the same forward value.

    Raises:
        ValueError: on a bad argument (named in the message).
    """

    def __init__(self, score: Callable, *, sigma: float = 0.25, noise_std: float = 0.25, steps: int = 5,
                 alpha: float = 1.0, seed: int = 0, grad_mode: str = "none"):
        super().__init__()
        check_score(score)  # callable; warns when BatchNorm/Dropout in training mode would make it random
        self.score = score
        self.sigma = checks.real("sigma", sigma, positive=True)
        self.noise_std = checks.real("noise_std", noise_std, 0.0)
        self.alpha = checks.real("alpha", alpha, positive=True)
        self.steps = checks.integer("steps", steps, 1)
        self.seed = checks.seed("seed", seed)
        self.grad_mode = checks.choice("grad_mode", grad_mode, GRAD_MODES)

    def _clamp(self, y: torch.Tensor) -> torch.Tensor:
        if self.grad_mode != "full_st_proj":
            return y.clamp(0, 1)
        # value + 0 is the clamp's value bit for bit; y + (clamp(y) - y).detach() would round.
        return y.detach().clamp(0, 1) + (y - y.detach())

    def _purify(self, x: torch.Tensor) -> torch.Tensor:
        """The purification of x (already validated, in the compute dtype), as differentiable as
        the caller's grad mode makes it."""
        call = score_call(self.score, double_backward=self.grad_mode.startswith("full") and torch.is_grad_enabled())
        noise = torch.randn(x.shape[1:], generator=torch.Generator("cpu").manual_seed(self.seed),
                            dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        y = self._clamp(x + self.noise_std * noise)
        sig = torch.full((x.shape[0],), self.sigma, device=x.device, dtype=x.dtype)
        for step in range(self.steps):
            # The boundary checks the output (shape, dtype, device, graph) and records NaN/Inf.
            y = y + self.alpha * self.sigma**2 * call(y, sig, step)
        return check_output_finite(call, self._clamp(y), who="ADPPurifier")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Purify x (B, C, H, W) in [0, 1].

        Returns:
            Purified images in [0, 1], x's shape, dtype and device (float16/bfloat16 images are
            purified in float32).

        Raises:
            ValueError: bad images (named with the fix), a score that cannot take them or returns
                a wrong output.
            NonFiniteScoreError: the score returned NaN/Inf (the message names the step).
            RuntimeError: in a backward pass through the output of grad_mode="none".
        """
        return purifier_forward(self._purify, x, self.grad_mode, who="ADPPurifier")
