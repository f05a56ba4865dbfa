"""The PurSAMERE loop made differentiable w.r.t. its input: the exact-gradient adaptive attack.

`purify_unrolled` runs the loop of SPEC section 2 with the reference's own building blocks
(`reference.purify.ere`, `project`, `sam_perturbation`), so its forward value is the
reference's, but keeps the graph: the ERE gradient is taken with
`torch.autograd.grad(..., create_graph=True)`, so backpropagating through a step
differentiates the score network twice (double backward). Each step is checkpointed
(`_CheckpointedStep`, an activation checkpoint in the manner of torch.utils.checkpoint):
only the step's inputs (x, m, v) are kept between steps and a step's graph is rebuilt
during the backward, so memory is O(K * image) plus one step's graph, not
O(K * one step's graph). Measured on the CPU (ConvScoreNet(1, 32, 4), 8 images 28x28,
N = 4, SAM on, forward + input gradient): peak RSS +209 / +211 / +211 MiB for
K = 4 / 16 / 32, against +475 / +1811 / +3522 MiB with plain autograd; time within
-12%..+50% of plain autograd.

What autograd gives at the non-smooth points, and we keep:
- linf SAM: d = r * sign(g) has zero derivative, so the SAM point moves with x only
  (the gradient of the ascent direction itself is not propagated); g is then computed
  without a graph, as that zero needs none;
- projection and clamp: derivative 1 where a bound is inactive and 0 where it binds
  (straight through inside, zero outside); torch.maximum/minimum split the gradient
  half/half at exact ties;
- l2 SAM and l2 projection: norms floored at 1e-12 as in the reference.
One deviation from plain autograd: sqrt(v) in Adam has an infinite derivative at v = 0
(a coordinate whose gradient is exactly zero so far), which would turn 0 * inf into NaN;
there the derivative is taken as 0. Forward values are unchanged.

The score's parameters are read detached: the attack differentiates w.r.t. the input only,
and the score model gets no `.grad`.

Straight-through estimators (`straight_through`, SPEC section 7; grad modes "full_st" and
"full_st_proj" of `Purifier`). Adam's update lr * m_hat / (sqrt(v_hat) + eps) is nearly
lr * sign(g) in its first steps (at k = 0 it is lr * g / (|g| + eps) exactly), and the
derivative of a sign is ~0: the exact gradient treats those steps' directions as constants,
and what the purification does with the input in its largest steps hardly reaches the
attacker. The estimators change the backward only; the forward value is the exact one, bit
for bit:
- "adam": the normaliser 1 / (sqrt(v_hat) + eps) is held constant (detached), so a step's
  derivative is lr / (sqrt(v_hat) + eps) times that of m_hat (v gets no gradient);
- "adam_proj": as "adam", and the projection onto the rho-ball and the [0, 1] clamp have the
  identity as derivative w.r.t. x (and none w.r.t. the ball's centre x_adv), so a bound
  that binds no longer blocks the gradient.
Both run through the same checkpointed step, which saves the same tensors (x, m, v, x_adv,
noise), so the memory figures above hold for them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import checks, graphs
from .purify import (
    CheckedScore,
    check_finite,
    check_score,
    check_score_options,
    chunk_images,
    make_noise,
    resolve_config,
    score_plan,
)
from .reference.purify import ere, project, sam_perturbation

STRAIGHT_THROUGH = (None, "adam", "adam_proj")
# Score pixels (rows x H x W) per chunk of this path on CUDA, where `purify` sets no bound: the
# backward of one checkpointed step keeps the step's graph with a double backward in it. For
# NCSNv2 (ngf 128, 32x32) that graph holds 260 MiB (linf SAM) / 313 MiB (l2 SAM) of distinct
# saved tensors per row (`python bench/exact_cost.py --saved-per-row`, on the CPU),
# so 64 rows keep ~20 GiB plus the backward's transients, where max_batch's 64 images x N = 8
# (512 rows) would need over 150 GiB. An estimate until bench/gpu_check.sh's "exact_memory"
# step measures the peak on the device (docs/gpu.md); chunk_rows= overrides it.
CUDA_CHUNK_PIXELS = 64 * 32 * 32


def _input_only(score):
    if not isinstance(score, nn.Module) or not any(p.requires_grad for p in score.parameters()):
        return score
    params = {name: p.detach() for name, p in score.named_parameters()}

    def call(y, sigma):
        return torch.func.functional_call(score, params, (y, sigma))

    return call


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def _ere_grad(x, score, sigma, eps, create_graph):
    xin = x if create_graph and x.requires_grad else x.detach().requires_grad_(True)
    with torch.enable_grad():
        e = ere(xin, score, sigma, eps)
        (g,) = torch.autograd.grad(e.sum(), xin, create_graph=create_graph)
    return g, e.detach()


def _step(x, m, v, x_adv, eps, k, sigma, lr, config, score, straight_through, create_graph):
    b1, b2 = config.betas
    # linf SAM: the first gradient only feeds sign(g), whose derivative is zero, so it needs no
    # graph; with one, the backward would walk a double backward of the score only to multiply
    # it by zero (bench/exact_cost.py: see docs/gpu.md for the time it saved).
    linf_sam = config.sam_radius > 0 and config.norm == "linf"
    g, e = _ere_grad(x, score, sigma, eps, create_graph and not linf_sam)
    if config.sam_radius > 0:
        d = sam_perturbation(g, config.sam_radius, config.norm)
        g, e_sam = _ere_grad(x + d, score, sigma, eps, create_graph)
        # The trace only feeds the NaN/Inf check: let a bad SAM evaluation show at this step.
        e = torch.where(torch.isfinite(e_sam), e, e_sam)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** (k + 1), 1 - b2 ** (k + 1)
    denom = _safe_sqrt(v / bc2) + config.adam_eps
    if straight_through is not None:
        denom = denom.detach()
    x = x - lr * (m / bc1) / denom
    if straight_through == "adam_proj":
        # value + 0 is the projected value bit for bit; x + (value - x).detach() would round.
        value = project(x.detach(), x_adv.detach(), config.rho, config.norm).clamp(0.0, 1.0)
        return value + (x - x.detach()), m, v, e
    x = project(x, x_adv, config.rho, config.norm).clamp(0.0, 1.0)
    return x, m, v, e


class _CheckpointedStep(torch.autograd.Function):
    """One loop step that keeps only its inputs; the backward reruns it with the graph.

    torch.utils.checkpoint (non-reentrant) would rerun the step inside the forward as well,
    once per inner torch.autograd.grad (its saved tensors are unpacked there): 5 score
    calls per SAM step instead of 2. The reentrant variant refuses torch.autograd.grad,
    which the attacks use. So the forward here runs the plain reference step (no graph)
    and the backward recomputes it with create_graph=True and takes the vector-Jacobian
    product: 2 score calls forward, 2 recomputed plus the double backward per step.
    """

    @staticmethod
    def forward(ctx, x, m, v, x_adv, eps, k, sigma, lr, config, score, straight_through):
        ctx.save_for_backward(x, m, v, x_adv, eps)
        ctx.args = (k, sigma, lr, config, score, straight_through)
        x_new, m_new, v_new, e = _step(x, m, v, x_adv, eps, *ctx.args, False)
        ctx.mark_non_differentiable(e)
        return x_new, m_new, v_new, e

    @staticmethod
    @once_differentiable  # the attacks need first-order gradients; a second order raises
    def backward(ctx, gx, gm, gv, _ge):
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(n) for t, n in zip(saved[:4], need)]
            outs = _step(*ins, saved[4], *ctx.args, True)[:3]
            pairs = [(o, g) for o, g in zip(outs, (gx, gm, gv)) if g is not None and o.requires_grad]
            wrt = [t for t in ins if t.requires_grad]
            grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                        allow_unused=True) if pairs and wrt else []
        it = iter(grads)
        return (*(next(it) if n else None for n in need), *[None] * 7)


def _loop(x_adv, score, config, noise, create_graph, checkpointed=True, straight_through=None):
    x, m, v = x_adv, torch.zeros_like(x_adv), torch.zeros_like(x_adv)
    trace = []
    for k, (sigma, lr) in enumerate(zip(config.step_sigmas(), config.step_lrs())):
        args = (x, m, v, x_adv, noise[k], k, sigma, lr, config, score, straight_through)
        if create_graph and checkpointed:
            x, m, v, e = _CheckpointedStep.apply(*args)
        else:
            x, m, v, e = _step(*args, create_graph)
        trace.append(e)
    return x, torch.stack(trace, dim=1)


def auto_chunk_rows(planned, device, image_shape):
    """Score rows per chunk of the exact path under chunk_rows="auto": `purify`'s plan
    (`planned`), and on CUDA at most CUDA_CHUNK_PIXELS / (H x W) rows (at least one)."""
    if torch.device(device).type != "cuda":
        return planned
    rows = max(1, CUDA_CHUNK_PIXELS // math.prod(image_shape[1:]))
    return rows if planned is None else min(planned, rows)


def purify_unrolled(x_adv: torch.Tensor, score, config=None, noise: torch.Tensor | None = None, *,
                    score_dtype=None, channels_last="auto", chunk_rows="auto",
                    straight_through=None) -> torch.Tensor:
    """PurSAMERE with a graph back to x_adv (exact gradient; per-step checkpointing).

    Args:
        x_adv: (B, C, H, W) floating images in [0, 1]; may require grad.
        score: callable score(y, sigma) -> (M, C, H, W).
        config: PurifyConfig (default PurifyConfig()).
        noise: (K, N, C, H, W) fixed noise (default `make_noise(config, ...)`).
        score_dtype, channels_last, chunk_rows: as in `purify` (bf16 autocast and the
            channels_last layout hold under double backward; torch.compile does not, so
            there is no compile_score here); chunk_rows="auto" also bounds a CUDA chunk to
            CUDA_CHUNK_PIXELS / (H x W) rows (64 at 32x32).
        straight_through: None (the exact gradient), "adam" (Adam's normaliser held
            constant in the backward) or "adam_proj" (and the projection and clamp passed
            straight through); see the module docstring. The forward value is the same.

    Returns:
        Purified images with x_adv's shape, dtype and device; differentiable w.r.t. x_adv
        when grad is enabled and x_adv requires grad, detached otherwise.

    Raises:
        ValueError: bad x_adv, noise of the wrong shape, a score returning the wrong shape,
            an unknown straight_through.
        NonFiniteScoreError: the score produced NaN/Inf (message names the step and sigma).
    """
    config = resolve_config(config, {})
    checks.images("x_adv", x_adv)
    check_score(score)
    checks.choice("straight_through", straight_through, STRAIGHT_THROUGH)
    shape = (config.num_steps, config.n_samples, *x_adv.shape[1:])
    noise = make_noise(config, x_adv.shape[1:]) if noise is None else checks.tensor("noise", noise, shape)
    check_score_options(score_dtype, False, x_adv.dtype)
    plan = score_plan(score, x_adv.shape[1:], x_adv.device, channels_last=channels_last, chunk_rows=chunk_rows)
    if chunk_rows == "auto":
        plan["chunk_rows"] = auto_chunk_rows(plan["chunk_rows"], x_adv.device, x_adv.shape[1:])
    module = graphs.module_of(score)
    if plan["channels_last"] and module is not None:
        module.to(memory_format=torch.channels_last)  # before _input_only takes its parameters
    compute = torch.float64 if x_adv.dtype == torch.float64 else torch.float32
    score = graphs.wrap_score(_input_only(score), graphs.ScoreOptions(score_dtype, plan["channels_last"]))
    create_graph = torch.is_grad_enabled() and x_adv.requires_grad and not torch.is_inference_mode_enabled()
    with torch.inference_mode(False), torch.enable_grad():
        src = x_adv if create_graph else x_adv.detach().clone()
        noise = noise.detach().to(device=x_adv.device, dtype=compute).clone()
        outs = []
        for chunk in src.split(chunk_images(config, plan["chunk_rows"])):
            x, trace = _loop(chunk.to(compute), CheckedScore(score, config), config, noise, create_graph,
                             straight_through=straight_through)
            check_finite(config, x.detach(), trace)
            outs.append(x)
        out = torch.cat(outs).to(x_adv.dtype)
    return out if create_graph else out.detach()

