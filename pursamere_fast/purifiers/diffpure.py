"""DiffPure (Nie et al., ICML 2022; SPEC 12): diffuse a little with the VP SDE, then solve the
reverse SDE (or the probability-flow ODE) back to t = 0 with a score model.

With xb = 2x - 1, ab(t) = exp(-t^2 (beta_max - beta_min) / 2 - t beta_min),
beta(t) = beta_min + t (beta_max - beta_min), h = t* / S and t_i = t* - i h:

    x <- sqrt(ab(t*)) xb + sqrt(1 - ab(t*)) z_0
    for i in 0 .. S-1:
        x <- x + h (beta(t_i) / 2 x + k beta(t_i) s_b(x, t_i)) + [sde] sqrt(beta(t_i) h) z_(i+1)
    return clamp((x + 1) / 2, 0, 1)

with k = 1 for the reverse SDE (Euler-Maruyama, `method="sde"`) and k = 1/2 and no noise for
the probability-flow ODE (`method="ode"`). s_b, the VP score in [-1, 1]-space, comes from any
VE score of this library ([0, 1] images) through
    y = (x / sqrt(ab) + 1) / 2,  sigma' = sqrt((1 - ab) / ab) / 2,  s_b = s(y, sigma') / (2 sqrt(ab)):
x / sqrt(ab) is the clean image in [-1, 1]-space plus noise of std sqrt((1 - ab) / ab), and
halving maps it to [0, 1]-space (data and noise both scale by 1/2, the score by 2).

Fast path. Each step is one network call and two fused affine maps whose coefficients are
computed once per purifier on the host in float64 (`_Step`):
    y = u x + 1/2,   x <- a x + c s(y, sigma') + g z_(i+1)
with u = 1 / (2 sqrt(ab)), a = 1 + h beta / 2, c = k h beta u, g = sqrt(beta h). The sigma'
tensors are built once per call, before the loop, and nothing syncs with the host inside it:
the score is called through `pursamere_fast.scores.boundary.ScoreCall`, which checks each
output and records NaN/Inf on the device, raised once after the loop (`NonFiniteScoreError`
naming the step and sigma'). A `ContinuousVPScore` (DiffPure's own score_sde model) goes
through the same conversion: the round trip VP -> VE -> VP is exact up to rounding (2e-16
in float64, tests/test_diffpure.py). The network is all of the cost at any realistic size:
bench/bench_diffpure.py, shipped Fashion-MNIST score, batch 32, S = 100, 1 thread of a shared
2-core Xeon, min of 3 alternated rounds: 6.06 s against the reference's 6.35 s and the bare
network's 7.22 s (S calls alone; the three are within the machine's noise). On a 4-channel
8x8 toy network the boundary's per-call NaN/Inf record (16 us of a ~200 us step) makes this
path 1.2x slower than the unchecked reference loop.

Noise. z_0 .. z_S, each (C, H, W), are shared by every image of a batch, so an image's result
does not depend on its batch mates (batch invariance: re-batching inside an attack changes
nothing). `noise="fixed"`: drawn from torch.Generator("cpu").manual_seed(seed) as one
torch.randn((S + 1, C, H, W), dtype=float32), then moved to the input's device and dtype:
identical on every call and every device (`make_noise` is public: the deterministic threat
model's attacker knows it). `noise="fresh"`: each call draws the next (S + 1, C, H, W) block
from one CPU generator seeded with `seed` when the purifier is built (or `reset`), so every
call sees new noise and a sequence of calls is reproducible from the seed; torch's global RNG
is never touched. The ODE uses z_0 only; the noise tensor keeps its (S + 1, C, H, W) shape
for both methods so that one explicit noise serves both.

Grad modes (`pursamere_fast.purifier.GRAD_MODES`): "none" runs under no_grad; "bpda" has the
"none" value and the identity backward; "full" backpropagates through every step, each step
under torch.utils.checkpoint (use_reentrant=False), so the graph holds one state image per
step and one step's network activations at a time instead of S steps' activations; each
step's forward is rerun once in the backward. Measured (bench/bench_diffpure.py, shipped
score, 8 images, forward + input gradient, peak RSS rise): 25.6 / 29.0 / 36.2 MiB at
S = 10 / 40 / 100, against 115 / 421 / 1037 MiB for plain autograd through the reference.
"full_st" is "full" (there is no Adam normaliser to hold constant) and "full_st_proj" passes
the final [0, 1] clamp straight through.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import checks
from ..purifier import GRAD_MODES, check_output_finite, purifier_forward, score_call
from ..scores.boundary import ScoreCall

__all__ = ["DiffPurePurifier", "METHODS", "NOISE_MODES", "vp_continuous_alpha_bar"]

METHODS = ("sde", "ode")
NOISE_MODES = ("fixed", "fresh")


def vp_continuous_alpha_bar(t: float, beta_min: float = 0.1, beta_max: float = 20.0) -> float:
    """ab(t) = exp(-t^2 (beta_max - beta_min) / 2 - t beta_min) of the continuous VP SDE (SPEC 11).

    Args:
        t: time in [0, 1].
        beta_min, beta_max: the linear beta(t) = beta_min + t (beta_max - beta_min).

    Returns:
        alpha_bar(t) as a Python float (float64).
    """
    return math.exp(-0.5 * t * t * (beta_max - beta_min) - t * beta_min)


class _Step(NamedTuple):
    """One reverse step's coefficients, float64 on the host (see the module docstring)."""

    sigma: float    # sigma' of the VE score call
    u: float        # y = u x + 1/2
    a: float        # x <- a x + c s + g z
    c: float
    g: float        # 0 for the ODE


class DiffPurePurifier(nn.Module):
    """DiffPure purification: [0, 1] images in, purified [0, 1] images out (SPEC 12).

    Args:
        score: a VE score s(y, sigma) of this library ([0, 1] images, y (M, C, H, W),
            sigma (M,)), converted to the VP score in [-1, 1]-space as in the module docstring.
            A `ContinuousVPScore` goes through the same conversion (exact up to rounding).
        t_star: diffusion time t* in (0, 1] (DiffPure's CIFAR-10 linf setting: 0.1).
        steps: S >= 1 reverse steps of size t* / S (DiffPure's torchsde dt = 1e-3 at t* = 0.1
            is S = 100).
        method: "sde" (reverse SDE, Euler-Maruyama) or "ode" (probability flow, Euler).
        beta_min, beta_max: the VP SDE's linear beta(t), 0 < beta_min <= beta_max.
        seed: seed of the CPU generator of the noise.
        noise: "fixed" (the same noise on every call: deterministic) or "fresh" (new noise on
            every call: the stochastic defence, attacked with EoT).
        grad_mode: one of `pursamere_fast.purifier.GRAD_MODES` (module docstring). Every mode
            has the same forward value.

    Raises:
        ValueError: on a bad argument (named in the message).
    """

    def __init__(self, score: Callable, *, t_star: float = 0.1, steps: int = 100, method: str = "sde",
                 beta_min: float = 0.1, beta_max: float = 20.0, seed: int = 0, noise: str = "fixed",
                 grad_mode: str = "none"):
        super().__init__()
        self.score = checks.function("score", score)
        self.t_star = checks.real("t_star", t_star, maximum=1.0, positive=True)
        self.steps = checks.integer("steps", steps, 1)
        self.method = checks.choice("method", method, METHODS)
        self.beta_min = checks.real("beta_min", beta_min, positive=True)
        self.beta_max = checks.real("beta_max", beta_max, self.beta_min)
        self.seed = checks.seed("seed", seed)
        self.noise_mode = checks.choice("noise", noise, NOISE_MODES)
        self.grad_mode = checks.choice("grad_mode", grad_mode, GRAD_MODES)
        self._plan = self._make_plan()
        self._cache: tuple | None = None  # (key, noise): the fixed noise on the last call's device/dtype
        self.reset()

    def _make_plan(self) -> list[_Step]:
        h = self.t_star / self.steps
        k = 1.0 if self.method == "sde" else 0.5
        plan = []
        for i in range(self.steps):
            t = self.t_star - i * h
            ab = vp_continuous_alpha_bar(t, self.beta_min, self.beta_max)
            beta = self.beta_min + t * (self.beta_max - self.beta_min)
            u = 0.5 / math.sqrt(ab)
            g = math.sqrt(beta * h) if self.method == "sde" else 0.0
            plan.append(_Step(math.sqrt((1 - ab) / ab) / 2, u, 1 + h * beta / 2, k * h * beta * u, g))
        return plan

    @property
    def timesteps(self) -> tuple[float, ...]:
        """The times t_0 = t*, ..., t_(S-1) = t* / S at which the score is called."""
        h = self.t_star / self.steps
        return tuple(self.t_star - i * h for i in range(self.steps))

    def reset(self, seed: int | None = None) -> None:
        """Restart the "fresh" noise sequence from `seed` (default: the purifier's seed).

        Args:
            seed: a seed in [0, 2**63 - 1], or None.

        Raises:
            ValueError: a bad seed.
        """
        seed = self.seed if seed is None else checks.seed("seed", seed)
        self._fresh = torch.Generator("cpu").manual_seed(seed)

    def make_noise(self, image_shape: Sequence[int], *, seed: int | None = None) -> torch.Tensor:
        """The "fixed" noise z_0 .. z_S of `seed` (default self.seed): float32 (S + 1, C, H, W) on the CPU.

        Args:
            image_shape: (C, H, W).
            seed: the seed.

        Returns:
            torch.randn((S + 1, C, H, W), generator=torch.Generator("cpu").manual_seed(seed)).

        Raises:
            ValueError: image_shape is not three positive integers, or a bad seed.
        """
        shape = checks.image_shape("image_shape", image_shape)
        seed = self.seed if seed is None else checks.seed("seed", seed)
        gen = torch.Generator("cpu").manual_seed(seed)
        return torch.randn((self.steps + 1, *shape), generator=gen, dtype=torch.float32)

    def _noise(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        shape = (self.steps + 1, *x.shape[1:])
        if noise is not None:
            return checks.tensor("noise", noise, shape).to(device=x.device, dtype=x.dtype)
        if self.noise_mode == "fresh":
            z = torch.randn(shape, generator=self._fresh, dtype=torch.float32)
            return z.to(device=x.device, dtype=x.dtype)
        # The fixed noise is the same on every call: keep the last one, so that an attack's
        # thousands of calls do not redraw (S + 1) C H W normals each time.
        key = (shape, x.device, x.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.make_noise(x.shape[1:]).to(device=x.device, dtype=x.dtype))
        return self._cache[1]

    @staticmethod
    def _step(call: ScoreCall, x: torch.Tensor, z: torch.Tensor | None, sigma: torch.Tensor, step: _Step, i: int
              ) -> torch.Tensor:
        s = call(x * step.u + 0.5, sigma, i)
        out = torch.add(x * step.a, s, alpha=step.c)
        return out if z is None else torch.add(out, z, alpha=step.g)

    def _sample(self, call: ScoreCall, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The diffusion and the reverse loop: [-1, 1]-space output before the clamp."""
        ab = vp_continuous_alpha_bar(self.t_star, self.beta_min, self.beta_max)
        state = torch.add(z[0] * math.sqrt(1 - ab), 2 * x - 1, alpha=math.sqrt(ab))
        sigmas = torch.tensor([st.sigma for st in self._plan], dtype=x.dtype).to(x.device)
        sigmas = sigmas[:, None].repeat(1, x.shape[0])  # (S, B): row i is the score's sigma at step i
        full = self.grad_mode.startswith("full") and torch.is_grad_enabled()
        sde = self.method == "sde"
        for i, step in enumerate(self._plan):
            zi = z[i + 1] if sde else None
            if full:
                state = checkpoint(self._step, call, state, zi, sigmas[i], step, i, use_reentrant=False)
            else:
                state = self._step(call, state, zi, sigmas[i], step, i)
        return state

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Purify x (B, C, H, W) in [0, 1].

        Args:
            x: the images.
            noise: (S + 1, C, H, W) z_0 .. z_S replacing the drawn noise (tests and attackers
                inject it); a "fresh" purifier's generator is not advanced.

        Returns:
            Purified images in [0, 1], x's shape, dtype and device.

        Raises:
            ValueError: bad x, bad noise, or a score that returns a wrong output (not a
                floating tensor of the input's shape and device, or detached under "full").
            NonFiniteScoreError: the score returned NaN/Inf (the message names the first such
                step and its sigma').
        """
        return purifier_forward(lambda xc: self._purify(xc, noise), x, self.grad_mode, who="DiffPurePurifier")

    def _purify(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        z = self._noise(x, noise)
        # One boundary per forward pass: it checks every output (shape, dtype, device, graph) and
        # records NaN/Inf without a host sync; the math attention kernel under "full"; a model
        # that cannot take the images (channels, device, dtype) is named (purifier.score_call).
        call = score_call(self.score, double_backward=self.grad_mode.startswith("full") and torch.is_grad_enabled())
        out = (self._sample(call, x, z) + 1) / 2
        if self.grad_mode == "full_st_proj" and torch.is_grad_enabled():
            # value + 0 is the clamp's value bit for bit; out + (clamp(out) - out).detach() would round.
            out = out.detach().clamp(0, 1) + (out - out.detach())
        else:
            out = out.clamp(0, 1)
        return check_output_finite(call, out, who="DiffPurePurifier")

    def extra_repr(self) -> str:
        return (f"t_star={self.t_star}, steps={self.steps}, method={self.method!r}, beta_min={self.beta_min}, "
                f"beta_max={self.beta_max}, seed={self.seed}, noise={self.noise_mode!r}, "
                f"grad_mode={self.grad_mode!r}")
