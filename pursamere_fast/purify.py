"""purify(): validation, backend dispatch, and the fused PurSAMERE loop.

The fused loop ("torch" and "triton" backends) runs SPEC section 2 with every buffer
allocated before the first step and every per-step scalar (sigma, lr, Adam bias
corrections) held in device tensors, so the loop issues no host sync. The three fused ops
come from `pursamere_fast.kernels`: Triton launchers for "triton", their torch fallbacks
(same signatures, same semantics) for "torch".
"""

from __future__ import annotations

import math

import torch

from . import kernels
from .config import PurifyConfig
from .reference.purify import purify_reference

BACKENDS = ("auto", "reference", "torch", "triton")


class NonFiniteScoreError(FloatingPointError):
    """The score model produced NaN or Inf inside the loop."""


def make_noise(config: PurifyConfig, image_shape, device=None, dtype=None) -> torch.Tensor:
    """The fixed Monte Carlo noise of `config`: (K, N, C, H, W), drawn on the CPU from `config.seed`.

    Drawing on the CPU makes the noise, and so the purifier, identical on every device.

    Args:
        config: the purification config (K, N and seed come from it).
        image_shape: (C, H, W).
        device, dtype: where to move the noise afterwards (default: CPU, float32).

    Raises:
        ValueError: if image_shape is not three positive integers.
    """
    image_shape = tuple(image_shape)
    if len(image_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in image_shape):
        raise ValueError(f"image_shape must be (C, H, W) of positive ints, got {image_shape}")
    gen = torch.Generator("cpu").manual_seed(config.seed)
    noise = torch.randn((config.num_steps, config.n_samples, *image_shape), generator=gen, dtype=torch.float32)
    return noise.to(device=device if device is not None else "cpu", dtype=dtype or torch.float32)


def purify(x_adv, score, config=None, *, noise=None, backend="auto", return_ere=False, **overrides):
    """Purify a batch with PurSAMERE (SPEC section 2).

    Args:
        x_adv: (B, C, H, W) floating images in [0, 1]. Never modified.
        score: callable score(y, sigma) -> (M, C, H, W), y (M, C, H, W), sigma (M,).
        config: PurifyConfig (default PurifyConfig()); `**overrides` replace its fields.
        noise: optional explicit (K, N, C, H, W) noise; default `make_noise(config, ...)`.
        backend: "auto" (triton on CUDA when available, else torch), "reference", "torch",
            "triton" (CUDA, or the CPU under TRITON_INTERPRET=1).
        return_ere: also return the (B, K) ERE trace, e_sigma_k at x before step k.

    Returns:
        x_pur with the shape, dtype and device of x_adv (and the ERE trace if asked; float32,
        or float64 for float64 inputs).

    Raises:
        ValueError: bad input, config, noise, backend, or a score returning the wrong shape.
        NonFiniteScoreError: the score produced NaN/Inf; the message names the step and sigma.
    """
    config = (config or PurifyConfig()).with_overrides(**overrides)
    _check_images(x_adv)
    backend = _resolve_backend(backend, x_adv.device)
    compute = torch.float64 if x_adv.dtype == torch.float64 else torch.float32
    shape = (config.num_steps, config.n_samples, *x_adv.shape[1:])
    if noise is None:
        noise = make_noise(config, x_adv.shape[1:], device=x_adv.device, dtype=x_adv.dtype)
    else:
        _check_noise(noise, shape)
        noise = noise.to(device=x_adv.device, dtype=x_adv.dtype)
    # Autograd is needed inside even when the caller runs under no_grad or inference_mode.
    with torch.inference_mode(False), torch.enable_grad():
        noise = noise.to(compute).clone()
        outs, traces = [], []
        for chunk in x_adv.split(config.max_batch):
            chunk = chunk.detach().to(compute).clone()
            if backend == "reference":
                x, trace, trace_sam = *purify_reference(chunk, score, config, noise), None
            else:
                x, trace, trace_sam = _fused_loop(chunk, score, config, noise, backend)
            _check_finite_trace(trace, trace_sam, config)
            outs.append(x)
            traces.append(trace)
        x_pur = torch.cat(outs).to(x_adv.dtype)
    if return_ere:
        return x_pur, torch.cat(traces)
    return x_pur


def _fused_loop(x_adv, score, config, noise, backend):
    """The loop with preallocated buffers and device-side schedules; returns (x, trace, trace_sam)."""
    if backend == "triton":
        ere_residual, mc_reduce_sam, adam_project = kernels.ere_residual, kernels.mc_reduce_sam, kernels.adam_project
    else:
        ere_residual = kernels.ere_residual_torch
        mc_reduce_sam = kernels.mc_reduce_sam_torch
        adam_project = kernels.adam_project_torch
    b, img = x_adv.shape[0], x_adv.shape[1:]
    n, d, k_total = config.n_samples, math.prod(img), config.num_steps
    dev, dt = x_adv.device, x_adv.dtype
    b1, b2 = config.betas
    sam = config.sam_radius > 0

    sig_t = torch.tensor(config.step_sigmas(), dtype=dt, device=dev)
    lr_t = torch.tensor(config.step_lrs(), dtype=dt, device=dev)
    bc1_t = torch.tensor([1 - b1 ** (k + 1) for k in range(k_total)], dtype=dt, device=dev)
    bc2_t = torch.tensor([1 - b2 ** (k + 1) for k in range(k_total)], dtype=dt, device=dev)
    eps_all = noise.view(k_total, n, d)
    xa = x_adv.view(b, d)
    x = xa.clone()
    m, v, g = torch.zeros_like(x), torch.zeros_like(x), torch.empty_like(x)
    y = torch.empty(b, n, d, dtype=dt, device=dev)
    y_sam = torch.empty_like(y) if sam else None
    dlds = torch.empty(b * n, d, dtype=dt, device=dev)
    sqnorm = torch.empty(b * n, dtype=dt, device=dev)
    trace = torch.empty(k_total, b, dtype=dt, device=dev)
    trace_sam = torch.empty(k_total, b, dtype=dt, device=dev) if sam else None

    def score_vjp(y_batch, sigma, eps, trace_row):
        # dL/dy for L = sum_b e_b; the ERE itself goes to trace_row as a by-product.
        yl = y_batch.view(b * n, *img).detach().requires_grad_(True)
        s = score(yl, sigma.expand(b * n))
        if not isinstance(s, torch.Tensor) or s.shape != yl.shape:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"score returned shape {got}, expected {tuple(yl.shape)}")
        s = s.to(dt)
        ere_residual(s.detach().view(b * n, d), eps, sigma, n, dlds, sqnorm)
        torch.mean(sqnorm.view(b, n), dim=1, out=trace_row)
        (gy,) = torch.autograd.grad(s, yl, grad_outputs=dlds.view_as(s))
        return gy.view(b, n, d)

    torch.addcmul(x.unsqueeze(1), sig_t[0], eps_all[0].unsqueeze(0), out=y)
    for k in range(k_total):
        sigma, eps = sig_t[k], eps_all[k]
        gy = score_vjp(y, sigma, eps, trace[k])
        if sam:
            mc_reduce_sam(gy, x, eps, sigma, config.sam_radius, config.norm, g, y_sam)
            gy = score_vjp(y_sam, sigma, eps, trace_sam[k])
        mc_reduce_sam(gy, x, eps, sigma, 0.0, config.norm, g)
        nxt = {}
        if k + 1 < k_total:
            nxt = dict(y_next=y, eps_next=eps_all[k + 1], sigma_next=sig_t[k + 1])
        adam_project(x, xa, m, v, g, lr_t[k], bc1_t[k], bc2_t[k], beta1=b1, beta2=b2,
                     adam_eps=config.adam_eps, rho=config.rho, norm=config.norm, **nxt)
    return x.view_as(x_adv), trace.t(), None if trace_sam is None else trace_sam.t()


def _check_finite_trace(trace, trace_sam, config):
    # One host sync after the loop instead of one per step.
    bad = ~torch.isfinite(trace).all(0)
    if trace_sam is not None:
        bad |= ~torch.isfinite(trace_sam).all(0)
    if bad.any():
        k = int(bad.nonzero()[0])
        raise NonFiniteScoreError(
            f"score produced NaN/Inf at step {k} (sigma={config.step_sigmas()[k]:.6g}); "
            "check the score model at this noise level"
        )


def _resolve_backend(backend, device):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and kernels.use_triton(device) else "torch"
    if backend == "triton" and not kernels.use_triton(device):
        raise ValueError(
            f"backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
            f"got device {device}, triton available: {kernels.triton_available()}"
        )
    return backend


def _check_images(x):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x_adv must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x_adv must have 4 dims (B, C, H, W), got ndim={x.dim()} shape={tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x_adv must be a floating tensor, got dtype={x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x_adv must not be empty, got shape={tuple(x.shape)}")
    x = x.detach()
    if not torch.isfinite(x).all():
        raise ValueError("x_adv contains NaN or Inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"x_adv must lie in [0, 1], got values in [{lo:.6g}, {hi:.6g}]")


def _check_noise(noise, shape):
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise ValueError(f"noise must be a floating torch.Tensor, got {getattr(noise, 'dtype', type(noise))}")
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must have shape (K, N, C, H, W) = {tuple(shape)}, got {tuple(noise.shape)}")
    if not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or Inf")
