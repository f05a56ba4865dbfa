"""Heterogeneous-noise diffusion purification (Pei et al., CVPR 2025; SPEC section 8).

"Divide and Conquer: Heterogeneous Noise Integration for Diffusion-based Adversarial
Purification" (arXiv 2503.01407). Strong noise (level t_l) on the pixels the classifier
attends to, weak noise (t_s) elsewhere, then DDIM back to the image.

Timesteps are 1-based (`vp_alpha_bar`): alpha_bar_t for t = 1..T, t = 0 the clean image. The
sampler, on the grid t_l, t_l - d, ..., 0 of stride d = T / grid_steps, with M the mask,
xb = 2x - 1 and alpha_bar written ab:

    x <- sqrt(ab_tl) xb + sqrt(1 - ab_tl) z                          (every pixel at t_l)
    for t in t_l, t_l - d, ..., d:  tau = t - d
        if tau >= t_s:                                               (resampling step)
            x <- M x + (1 - M) (sqrt(ab_t) xb + sqrt(1 - ab_t) r)    (fresh copy of the input)
            U times: t <- t + 1;  x <- sqrt(1 - beta_t) x + sqrt(beta_t) f
        x <- DDIM(x, eps_hat(x, t), ab_t, ab_tau)                    (eta = 0; one network call)
    return clamp((x + 1) / 2, 0, 1)

The pixels outside M are replaced, at every step until the next grid time falls below t_s,
by the input noised afresh to the current level, so they leave the loop with the noise of
t_s; the pixels inside M keep their trajectory from t_l. The U single forward steps are the
paper's "single-step resampling" (the official code's `forward_noise_steps`): the image
pasted together from generated (inside) and re-noised (outside) pixels is pushed U steps up
in noise, and the DDIM jump then goes from t + U straight to tau, so the seam is denoised
together with the rest at the cost of no extra network call (RePaint's resampling instead
jumps back and forth with a network call each time).

Fast path. The replacement and the U forward steps are affine in (x, xb) and their noise is
the same for every image, so one resampling step is
    x <- where(M, a x + n, k xb + o),   a = sqrt(ab_(t+U) / ab_t),  k = sqrt(ab_(t+U)),
    n = sum_j sqrt(beta_(t+j)) sqrt(ab_(t+U) / ab_(t+j)) f_j,   o = a sqrt(1 - ab_t) r + n,
with n and o of shape (C, H, W) computed once per call for all steps: 3 ops on the batch
instead of the reference's 7 + 3U, and the DDIM step is 3 with host-side coefficients.
Measured with `bench/bench_hetero.py` (1 thread, a 2-core CPU shared with another job, medians
of 3 rounds timed in alternation; t_l = 200, t_s = 100, U = 3, S = 100: 20 network calls):
- shipped Fashion-MNIST score, batch 32: 2.26-2.32 s against the reference's 2.35-2.50 s
  (1.01x-1.11x, within the machine's noise: the network is all of it);
- ConvScoreNet(1, 4, 2) on 8x8 images, batch 32, where the sampler's own ops are a large part
  of the time as on a GPU at small batches: 18-20 ms against 20-23 ms (1.09x-1.13x).
A Triton kernel for the where/add would save at most those few elementwise passes over a
(B, C, H, W) tensor per network call, against the network's tens of kernels: not measurable.

`purify_runs` batches R runs into passes of up to max_rows network rows. R = 5, batch 32: the
small score 28 ms against 80 ms for 5 separate runs (2.8x: one 160-row pass); the shipped score
13.7 s against 14.0 s (one run per pass on the CPU, see CPU_MAX_VALUES: larger calls are not
faster there).

Memory of grad_mode="full" (shipped score, 8 images, U = 3, forward + input gradient): peak
RSS +98 / +100 MiB for 10 / 40 grid steps checkpointed, +102 / +379 MiB with plain autograd
through the reference; 1.45x the plain autograd's time per step (each step's forward is rerun
in the backward), plus ~2 s once per process for torch.utils.checkpoint's first call.

Deviations from the official code (GitHub GaozhengPei/Purification), all deliberate:
- Its timesteps are 0-based indices into alpha_bar (index i is our t = i + 1), and its grid
  ends at index 0 (ab = 1 - 1e-4, a residual noise of sigma' = 0.005 in [0, 1] units); ours
  ends at t = 0, the clean image (DDIM's final step with alpha_bar_0 = 1).
- Its classifier sees the [-1, 1] image through ImageNet normalisation; ours sees the [0, 1]
  input as it is. Its hooks are registered at every call and never removed; ours are
  removed, even on an exception. A stage whose map is constant has no salient pixel here
  (the official min-max scaling divides by zero).
- mask="all" skips the resampling (no pixel outside the mask is left to re-noise), so it is
  plain DDIM purification from t_l, the "uniform noise" baseline.

Schedule. SPEC 8's linear betas (1e-4 .. 0.02, T = 1000) for a VE score of this library, which
has no schedule of its own. A `VPScore` on [-1, 1] data (a DDPM/diffusers model) brings its
own: alpha_bar = [1, alphas_cumprod...], betas from the ratios beta_t = 1 - ab_t / ab_(t-1),
T = len(alphas_cumprod), and the network is asked for its noise prediction at x_t and its own
0-based time t - 1 (`VPScore.noise_prediction`), with no VE round trip.

Score calls go through the score-call boundary (`pursamere_fast.purifier.score_call`): outputs
checked, NaN/Inf recorded on the device and raised once per pass naming the step.
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
from ..purify import check_score
from ..scores.adapters import NoisePredictor, VPNoisePredictor, VPScore, vp_alpha_bar
from .saliency import saliency_mask, stage_names

__all__ = ["HeteroPurifier", "HeteroNoise", "MASKS", "ddim_step", "vp_alpha_bar"]

MASKS = ("saliency", "random", "all")
# The betas of SPEC 8; `HeteroPurifier` takes T only.
BETA_MIN, BETA_MAX = 1e-4, 0.02
# Input values (rows * C * H * W) per sampler pass of `purify_runs` on the CPU (max_rows=None):
# 32 Fashion-MNIST images. Shipped score, 1 thread, AMD EPYC (32 MiB L3) shared with another
# job, 160 rows through the bare network in calls of 32 / 64 / 160 rows: min 0.31 / 0.33 /
# 0.47 s over 15 alternations (the per-row cost is flat from 8 to 96 rows, and a 160-row
# activation, 16 MiB, takes a convolution's input and output out of the L3); purify_runs(5) of
# 32 images in one 160-row pass took 11.8-14.9 s against 7.4-8.6 s for 5 separate runs. The cap
# counts input values, not rows, since small images' rows are cheap: 8x8 images with a
# 4-channel score run 5 x 32 rows in one pass in 29 ms against 87 ms for 5 separate runs.
# Other devices batch every run into one pass.
CPU_MAX_VALUES = 32 * 28 * 28


class HeteroNoise(NamedTuple):
    """All the noise of one run, each draw of shape (C, H, W) shared across the batch.

    Attributes:
        init: (C, H, W), the noise of the forward diffusion to t_l.
        renoise: (n, C, H, W), per resampling step the noise of the fresh copy of the input.
        forward: (n, U, C, H, W), per resampling step the noise of the U single forward steps.
    """

    init: torch.Tensor
    renoise: torch.Tensor
    forward: torch.Tensor


def ddim_step(x_t: torch.Tensor, eps_hat: torch.Tensor, ab_t, ab_prev) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) from alpha_bar ab_t to ab_prev >= ab_t.

    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps_hat with
    x0_hat = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t), written as one affine map of
    (x_t, eps_hat) whose coefficients are computed once.

    Args:
        x_t: the noised images.
        eps_hat: the predicted noise, x_t's shape.
        ab_t, ab_prev: alpha_bar at the current and the next (less noisy) time, Python floats
            in (0, 1] or tensors broadcastable to x_t (these are not checked: a check syncs).

    Returns:
        x_prev, x_t's shape.

    Raises:
        ValueError: a float ab_t or ab_prev outside (0, 1].
    """
    for name, ab in (("ab_t", ab_t), ("ab_prev", ab_prev)):
        if not isinstance(ab, torch.Tensor):
            checks.real(name, ab, maximum=1.0, positive=True)
    scale = (ab_prev / ab_t) ** 0.5
    return x_t * scale + eps_hat * ((1 - ab_prev) ** 0.5 - scale * (1 - ab_t) ** 0.5)


class _Step(NamedTuple):
    """One grid step, its coefficients computed on the host in float64 once."""

    t: int              # the time of the network call (t + U after resampling)
    ab_t: float
    ab_tau: float
    resample: int       # index of the resampling step, or -1
    a: float            # sqrt(ab_(t+U) / ab_t)
    k: float            # sqrt(ab_(t+U))


class HeteroPurifier(nn.Module):
    """Heterogeneous-noise diffusion purification: one run, [0, 1] images in and out.

    See the module docstring for the sampler. All noise comes from a CPU generator seeded
    with `seed` (`make_noise`), each draw of shape (C, H, W) shared across the batch, so the
    output is deterministic and batch invariant (every image sees the same noise; the mask
    is per image).

    Args:
        score: a VE score model s(y, sigma) of this library ([0, 1] images; wrapped in
            `VPNoisePredictor`), or a `NoisePredictor` (`VPNoisePredictor` with this T and
            the SPEC betas, or `NativeNoisePredictor` for a native eps-prediction model).
        classifier: nn.Module from [0, 1] images to logits, whose stage activations give the
            saliency mask; may be None with mask="all".
        t_l: strong noise level, on the grid, t_s <= t_l <= T.
        t_s: weak noise level, on the grid, 0 < t_s.
        resample_steps: U >= 0 single forward steps per resampling step
            (t_l + U <= T when there is a resampling step).
        grid_steps: S, the DDIM grid over [0, T] has stride T / S (T % S == 0); the run makes
            t_l / (T / S) network calls.
        tau: saliency threshold in [0, 1].
        seed: seed of all the noise; `purify_runs` uses seed .. seed + runs - 1.
        grad_mode: one of `pursamere_fast.purifier.GRAD_MODES`: "none" (no graph), "bpda"
            (identity backward), "full" (exact backprop through the sampler, each grid step
            checkpointed so that memory holds one step's graph plus an image per step; the
            mask is a constant), "full_st" (the same as "full": there is no Adam normaliser
            to hold constant), "full_st_proj" (as "full", the final [0, 1] clamp passed
            straight through). Every mode has the same forward value.
        mask: "saliency" (the classifier's, `saliency_mask`), "random" (per image the same
            number of pixels as its saliency mask, at places drawn from the seed after the
            noise, so it sees the saliency run's noise: the control of SPEC 8), or "all"
            (every pixel at t_l and no resampling: plain DDIM purification from t_l; the
            uniform-t_s baseline is HeteroPurifier(t_l=t_s, mask="all")).
        top_q: if given, the saliency mask is the top_q fraction of pixels instead of A >= tau.
        stages: the classifier's stage modules (see `saliency_map`).
        T: diffusion steps of the schedule `vp_alpha_bar(T)` (default 1000); for a `VPScore`
            on [-1, 1] data, its schedule's length (the default; another T is an error).
        max_rows: most network rows per sampler pass of `purify_runs` (whole runs, at least
            one per pass); None: CPU_MAX_VALUES // (C * H * W) rows on the CPU, every run in
            one pass elsewhere.

    Raises:
        ValueError: on a bad argument (named in the message).
    """

    def __init__(self, score: Callable, classifier: nn.Module | None, *, t_l: int = 200, t_s: int = 100,
                 resample_steps: int = 3, grid_steps: int = 500, tau: float = 0.9, seed: int = 0,
                 grad_mode: str = "none", mask: str = "saliency", top_q: float | None = None,
                 stages: Sequence[str] | None = None, T: int | None = None, max_rows: int | None = None):
        super().__init__()
        check_score(score)  # callable; warns when BatchNorm/Dropout in training mode would make it random
        # float64 on the CPU: coefficients only. alpha_bar[t], t = 0..T (1-based, alpha_bar[0] = 1)
        # and betas[t - 1] = beta_t.
        self.T, self.alpha_bar, self.betas = _schedule(score, T)
        self.grid_steps = checks.integer("grid_steps", grid_steps, 1, self.T)
        if self.T % self.grid_steps:
            raise ValueError(f"grid_steps must divide T = {self.T}, got {grid_steps!r}")
        self.stride = self.T // self.grid_steps
        self.t_l = checks.integer("t_l", t_l, 1, self.T)
        self.t_s = checks.integer("t_s", t_s, 1, self.t_l)
        for name, value in (("t_l", self.t_l), ("t_s", self.t_s)):
            if value % self.stride:
                raise ValueError(f"{name} must be on the grid (a multiple of T / grid_steps = {self.stride}), "
                                 f"got {value!r}")
        self.resample_steps = checks.integer("resample_steps", resample_steps, 0)
        self.tau = checks.real("tau", tau, 0.0, 1.0)
        self.top_q = None if top_q is None else checks.real("top_q", top_q, maximum=1.0, positive=True)
        self.seed = checks.seed("seed", seed)
        self.grad_mode = checks.choice("grad_mode", grad_mode, GRAD_MODES)
        self.mask_mode = checks.choice("mask", mask, MASKS)
        self.max_rows = None if max_rows is None else checks.integer("max_rows", max_rows, 1)
        self.n_resample = 0 if mask == "all" else (self.t_l - self.t_s) // self.stride
        if self.n_resample and self.t_l + self.resample_steps > self.T:
            raise ValueError(f"resample_steps must be <= T - t_l = {self.T - self.t_l} (the forward steps from "
                             f"t_l would leave the schedule), got {resample_steps!r}")
        if classifier is None and mask != "all":
            raise ValueError(f"classifier must be an nn.Module for mask={mask!r} (None only with mask='all')")
        if classifier is not None:
            checks.function("classifier", classifier)
        self.classifier = classifier
        self.stages = None if mask == "all" else stage_names(classifier, stages)
        self.noise_predictor = self._noise_predictor(score)
        self._plan, self._noise_coefficients = self._make_plan()

    def _noise_predictor(self, score) -> NoisePredictor:
        if _own_schedule(score):
            return ModelNoisePredictor(score)
        if isinstance(score, VPNoisePredictor) and (score.T, score.beta_min, score.beta_max) != (self.T, BETA_MIN,
                                                                                                    BETA_MAX):
            raise ValueError(f"score must use this purifier's schedule (T={self.T}, betas {BETA_MIN}..{BETA_MAX}), "
                             f"got a VPNoisePredictor with {score.extra_repr()}")
        if isinstance(score, NoisePredictor):
            return score
        return VPNoisePredictor(checks.function("score", score), T=self.T, beta_min=BETA_MIN, beta_max=BETA_MAX)

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The DDIM grid t_l, t_l - stride, ..., 0."""
        return tuple(range(self.t_l, -1, -self.stride))

    def _make_plan(self):
        """Per grid step its `_Step`; per resampling step the (U,) weights of the forward
        noises in n and the weight of the renoise in o (module docstring), float64."""
        ab, u = self.alpha_bar.tolist(), self.resample_steps
        beta = [0.0, *self.betas.tolist()]  # beta[t], 1-based
        plan, weights_f, weights_r = [], [], []
        for t in self.timesteps[:-1]:
            tau = t - self.stride
            if len(weights_r) < self.n_resample:
                top = t + u
                a = math.sqrt(ab[top] / ab[t])
                weights_f.append([math.sqrt(beta[t + j] * ab[top] / ab[t + j])
                                  for j in range(1, u + 1)])
                weights_r.append(a * math.sqrt(1 - ab[t]))
                plan.append(_Step(top, ab[top], ab[tau], len(weights_r) - 1, a, math.sqrt(ab[top])))
            else:
                plan.append(_Step(t, ab[t], ab[tau], -1, 1.0, 1.0))
        forward = torch.tensor(weights_f, dtype=torch.float64).view(self.n_resample, u)
        return plan, (forward, torch.tensor(weights_r, dtype=torch.float64))

    def make_noise(self, image_shape: Sequence[int], *, seed: int | None = None) -> HeteroNoise:
        """The noise of the run with `seed` (default self.seed), float32 on the CPU.

        One torch.randn of (1 + n (1 + U), C, H, W) from torch.Generator("cpu").manual_seed(seed),
        in the order init, then per resampling step renoise and the U forward noises.

        Args:
            image_shape: (C, H, W).
            seed: the run's seed.

        Returns:
            HeteroNoise.

        Raises:
            ValueError: image_shape is not three positive integers, or a bad seed.
        """
        shape = checks.image_shape("image_shape", image_shape)
        return self._draw(shape, self.seed if seed is None else checks.seed("seed", seed), False)[0]

    def _draw(self, image_shape, seed, permutation):
        gen = torch.Generator("cpu").manual_seed(seed)
        n, u = self.n_resample, self.resample_steps
        z = torch.randn((1 + n * (1 + u), *image_shape), generator=gen, dtype=torch.float32)
        steps = z[1:].view(n, 1 + u, *image_shape)
        noise = HeteroNoise(z[0], steps[:, 0], steps[:, 1:])
        if not permutation:
            return noise, None
        # After the noise, so that the random-mask run sees the saliency run's noise.
        return noise, torch.randperm(image_shape[1] * image_shape[2], generator=gen)

    def mask(self, x: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
        """This purifier's strong-noise mask for x: bool (B, 1, H, W), computed without a graph;
        every pixel when no step resamples (mask="all" or t_s = t_l: the classifier is not run).

        Args:
            x: (B, C, H, W) images in [0, 1].
            seed: for mask="random", the run's seed (default self.seed).

        Returns:
            bool (B, 1, H, W).

        Raises:
            ValueError: bad x (as `forward`), or a bad seed.
        """
        checks.images("x", x)
        return self._masks(x, [self.seed if seed is None else checks.seed("seed", seed)])[0]

    def _masks(self, x, seeds) -> torch.Tensor:
        """(runs or 1, B, 1, H, W): one saliency mask for every run; a random mask per run."""
        b, _, h, w = x.shape
        if self.n_resample == 0:
            return torch.ones((1, b, 1, h, w), dtype=torch.bool, device=x.device)
        salient = saliency_mask(self.classifier, x, stages=self.stages, tau=self.tau, top_q=self.top_q)
        if self.mask_mode == "saliency":
            return salient[None]
        counts = salient.flatten(1).sum(1, keepdim=True)  # (B, 1)
        masks = []
        for seed in seeds:
            perm = self._draw(tuple(x.shape[1:]), seed, True)[1].to(x.device)
            rank = torch.empty_like(perm).scatter_(0, perm, torch.arange(h * w, device=x.device))
            masks.append((rank[None] < counts).view(b, 1, h, w))
        return torch.stack(masks)

    def _check_noise(self, noise, x) -> HeteroNoise:
        shape = tuple(x.shape[1:])
        n, u = self.n_resample, self.resample_steps
        if not isinstance(noise, tuple) or len(noise) != 3:
            raise ValueError(f"noise must be a HeteroNoise (init, renoise, forward), got {type(noise).__name__}")
        init, renoise, forward = noise
        checks.tensor("noise.init", init, shape)
        checks.tensor("noise.renoise", renoise, (n, *shape))
        checks.tensor("noise.forward", forward, (n, u, *shape))
        return HeteroNoise(init, renoise, forward)

    def _check_mask(self, mask, x) -> torch.Tensor:
        b, _, h, w = x.shape
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, 1, h, w):
            raise ValueError(f"mask must be a bool tensor of shape {(b, 1, h, w)}, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        return mask.to(x.device)[None]

    def _sample(self, x: torch.Tensor, noises: Sequence[HeteroNoise], masks: torch.Tensor) -> torch.Tensor:
        """The sampler for len(noises) runs at once: (runs, B, C, H, W) in [0, 1]."""
        runs, b = len(noises), x.shape[0]
        like = dict(device=x.device, dtype=x.dtype)
        init, renoise, forward = (torch.stack(f).to(**like) for f in zip(*noises))
        w_forward, w_renoise = (wt.to(**like) for wt in self._noise_coefficients)
        # n, o of the module docstring for every resampling step: (runs, n, C, H, W).
        n = (forward * w_forward.view(1, *w_forward.shape, 1, 1, 1)).sum(2)
        o = renoise * w_renoise.view(1, -1, 1, 1, 1) + n
        xb = (2 * x - 1)[None]
        ab_l = float(self.alpha_bar[self.t_l])
        state = torch.add(init[:, None] * math.sqrt(1 - ab_l), xb, alpha=math.sqrt(ab_l))
        full = self.grad_mode.startswith("full") and torch.is_grad_enabled()
        times = [torch.full((runs * b,), step.t, dtype=torch.int64, device=x.device) for step in self._plan]
        eps = _NoiseCall(self.noise_predictor, double_backward=full)
        for k, (step, t) in enumerate(zip(self._plan, times)):
            i = step.resample
            extra = (n[:, i, None], o[:, i, None]) if i >= 0 else (None, None)
            if full:
                state = checkpoint(self._step, eps, state, xb, masks, *extra, t, step, k, use_reentrant=False)
            else:
                state = self._step(eps, state, xb, masks, *extra, t, step, k)
        out = (state + 1) / 2
        if self.grad_mode != "full_st_proj":
            out = out.clamp(0, 1)
        else:
            # value + 0 is the clamp's value bit for bit; out + (clamp(out) - out).detach() would round.
            out = out.detach().clamp(0, 1) + (out - out.detach())
        return check_output_finite(eps.call, out, who="HeteroPurifier")

    @staticmethod
    def _step(eps, state, xb, masks, n, o, t, step: _Step, k: int):
        if step.resample >= 0:
            state = torch.where(masks, torch.add(n, state, alpha=step.a), torch.add(o, xb, alpha=step.k))
        e = eps(state.flatten(0, 1), t, step, k).view_as(state)
        return ddim_step(state, e, step.ab_t, step.ab_tau)

    def _passes(self, x, seeds, noise, mask) -> torch.Tensor:
        """All runs, in passes of at most max_rows network rows: (runs, B, C, H, W)."""
        noises = [self._check_noise(noise, x)] if noise is not None else \
            [self.make_noise(x.shape[1:], seed=s) for s in seeds]
        masks = self._check_mask(mask, x) if mask is not None else self._masks(x, seeds)
        rows = self.max_rows or (CPU_MAX_VALUES // x[0].numel() if x.device.type == "cpu" else len(seeds) * x.shape[0])
        per_pass = max(1, rows // x.shape[0])
        if per_pass >= len(seeds):
            return self._sample(x, noises, masks)
        return torch.cat([self._sample(x, noises[r:r + per_pass], masks if len(masks) == 1 else masks[r:r + per_pass])
                          for r in range(0, len(seeds), per_pass)])

    def _run(self, x, seeds, noise=None, mask=None) -> torch.Tensor:
        # Validation, precision and grad modes as every purifier (pursamere_fast.purifier).
        return purifier_forward(lambda xc: self._passes(xc, seeds, noise, mask), x, self.grad_mode,
                                who="HeteroPurifier")

    def forward(self, x: torch.Tensor, noise: HeteroNoise | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Purify x (B, C, H, W) in [0, 1] with one run.

        Args:
            x: the images.
            noise: replaces `make_noise(x.shape[1:])` (tests and attackers inject it).
            mask: bool (B, 1, H, W), replaces `mask(x)`.

        Returns:
            Purified images in [0, 1], x's shape, dtype and device (float16/bfloat16 images are
            purified in float32).

        Raises:
            ValueError: bad x (named with the fix), noise or mask; a score or classifier that
                cannot take x (e.g. another channel count) or returns a wrong output.
            NonFiniteScoreError: the score returned NaN/Inf (the message names the step).
            RuntimeError: in a backward pass through the output of grad_mode="none".
        """
        return self._run(x, [self.seed], noise, mask)[0]

    def purify_runs(self, x: torch.Tensor, runs: int) -> torch.Tensor:
        """`runs` runs with seeds seed .. seed + runs - 1, batched into sampler passes of up to
        max_rows network rows (fewer, larger network calls).

        Equal to the runs of separate purifiers with those seeds (bitwise where the network's
        rows do not depend on the batch size, as measured in tests/test_hetero.py), in the
        same grad mode; the saliency mask is computed once.

        Args:
            x: (B, C, H, W) images in [0, 1].
            runs: >= 1.

        Returns:
            (runs, B, C, H, W).

        Raises:
            ValueError: bad x or runs.
        """
        runs = checks.integer("runs", runs, 1)
        return self._run(x, [self.seed + r for r in range(runs)])

    def extra_repr(self) -> str:
        return (f"t_l={self.t_l}, t_s={self.t_s}, resample_steps={self.resample_steps}, grid_steps={self.grid_steps}, "
                f"tau={self.tau}, top_q={self.top_q}, mask={self.mask_mode!r}, seed={self.seed}, "
                f"grad_mode={self.grad_mode!r}, T={self.T}, max_rows={self.max_rows}")


def _own_schedule(score) -> bool:
    """A DDPM-family model on [-1, 1] data: the purifier runs on its schedule and its own time."""
    return isinstance(score, VPScore) and score.data_range == (-1.0, 1.0)


def _schedule(score, T) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(T, alpha_bar (T + 1,), betas (T,)), float64 on the CPU: the model's own schedule for a
    `VPScore` on [-1, 1] data (an explicit T must agree), else SPEC 8's linear one."""
    if _own_schedule(score):
        ac = score.schedule.alphas_cumprod.detach().to("cpu", torch.float64)
        if T is not None and checks.integer("T", T, 1) != ac.numel():
            raise ValueError(f"T must be the score model's schedule length {ac.numel()} (a VPScore brings its "
                             f"alphas_cumprod), got {T!r}")
        alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), ac])
        return ac.numel(), alpha_bar, 1 - alpha_bar[1:] / alpha_bar[:-1]
    T = checks.integer("T", 1000 if T is None else T, 1)
    return T, vp_alpha_bar(T, BETA_MIN, BETA_MAX), torch.linspace(BETA_MIN, BETA_MAX, T, dtype=torch.float64)


class ModelNoisePredictor(NoisePredictor):
    """A `VPScore`'s network as the noise predictor of the purifier that runs on its schedule:
    eps_hat(xb_t, t) = score.noise_prediction(xb_t, t - 1) (1-based t here, 0-based for the
    model; v and x_0 predictions converted by the adapter)."""

    def __init__(self, score: VPScore):
        super().__init__()
        self.score = score

    def forward(self, xb_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.score.noise_prediction(xb_t, t - 1)


class _AtTime:
    """A noise predictor as the score-call boundary calls a score, (x_t, sigma): at the model time
    `t` set before each call (the boundary records sigma for its NaN/Inf message only). A plain
    object, not a module: the boundary leaves its input's dtype alone and the predictor casts
    for its own network."""

    def __init__(self, predictor):
        self.predictor, self.t = predictor, None

    def __call__(self, x_t, sigma):
        return self.predictor(x_t, self.t)


class _NoiseCall:
    """eps_hat(xb_t, t) of a purifier pass through the score-call boundary, one per pass.

    A VE score (wrapped in `VPNoisePredictor`) is called as a score, y = (xb_t / sqrt(ab) + 1) / 2
    at sigma' = sqrt((1 - ab) / ab) / 2, eps_hat = -sigma' s (the adapter's arithmetic, op for op,
    so the result is bitwise the adapter's). Any other noise predictor is called at its time t.
    """

    def __init__(self, predictor: NoisePredictor, *, double_backward: bool):
        if isinstance(predictor, VPNoisePredictor):
            self.alpha_bar = predictor.alpha_bar
            self.call = score_call(predictor.score, double_backward=double_backward)
        else:
            self.alpha_bar, self.timed = None, _AtTime(predictor)
            self.call = score_call(self.timed, double_backward=double_backward)

    def __call__(self, xb_t: torch.Tensor, t: torch.Tensor, step: _Step, k: int) -> torch.Tensor:
        where = f"{k} (t={step.t})"
        if self.alpha_bar is None:
            self.timed.t = t  # set on every call, also when the checkpoint recomputes this step
            sigma = torch.full_like(t, 0.5 * math.sqrt((1 - step.ab_t) / step.ab_t), dtype=xb_t.dtype)
            return self.call(xb_t, sigma, where)
        if self.alpha_bar.device != t.device:
            # Images on another device than the score (whose device the table is on): once per
            # pass, so that the score call, not this lookup, fails and names both devices.
            self.alpha_bar = self.alpha_bar.to(t.device)
        ab = self.alpha_bar[t]
        sigma = (0.5 * ((1 - ab) / ab).sqrt()).to(xb_t.dtype)
        inv_sqrt_ab = ab.rsqrt().to(xb_t.dtype).view(-1, 1, 1, 1)
        y = (xb_t * inv_sqrt_ab + 1) / 2
        return -sigma.view(-1, 1, 1, 1) * self.call(y, sigma, where)
