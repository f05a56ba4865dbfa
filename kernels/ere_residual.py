"""ERE residual: r = eps[n] + sigma * s, per-row ||r||^2 and dL/ds = 2*sigma*r/N, in one pass.

Semantics: `pursamere_fast.reference.ere_residual`.
"""

import torch

from .. import checks
from .common import (
    block_size,
    check_device_scalar,
    check_float_dtype,
    check_tensor,
    div_rn,
    require_triton,
    tl,
    triton_jit,
)


@triton_jit
def _ere_residual_kernel(
    s_ptr,  # [B*N, D] score at the perturbed batch, row b*N + n
    eps_ptr,  # [N, D] this step's noise
    sigma_ptr,  # [] this step's sigma
    grad_ptr,  # [B*N, D] out: dL/ds = 2*sigma*r/N
    sqnorm_ptr,  # [B*N] out: ||r||^2 per row
    D,
    N: tl.constexpr,  # n_samples: a config constant, so one compile per config
    BLOCK: tl.constexpr,
):
    # One program per row: the row's sum is a fixed-order loop plus one tree reduction, so the
    # result does not depend on the launch (no atomics).
    row = tl.program_id(0).to(tl.int64)
    n = row % N
    sigma = tl.load(sigma_ptr)
    two_sigma = 2 * sigma
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=sigma.dtype)
    for start in range(0, D, BLOCK):
        offs = start + cols
        mask = offs < D
        s = tl.load(s_ptr + row * D + offs, mask=mask, other=0.0)
        e = tl.load(eps_ptr + n * D + offs, mask=mask, other=0.0)
        r = e + sigma * s
        acc += r * r
        tl.store(grad_ptr + row * D + offs, div_rn(two_sigma * r, tl.full((), N, sigma.dtype)), mask=mask)
    tl.store(sqnorm_ptr + row, tl.sum(acc, axis=0))


def _check(s, eps, sigma, n_samples, out_grad, out_sqnorm):
    check_float_dtype("s", s)
    if s.dim() != 2:
        raise ValueError(f"s must be 2-D [B*N, D], got shape {tuple(s.shape)}")
    checks.integer("n_samples", n_samples, 1)
    rows, d = s.shape
    if rows % n_samples != 0:
        raise ValueError(f"s has {rows} rows, not a multiple of n_samples={n_samples}")
    check_tensor("s", s, (rows, d), s)
    check_tensor("eps", eps, (n_samples, d), s)
    check_device_scalar("sigma", sigma, s)
    check_tensor("out_grad", out_grad, (rows, d), s)
    check_tensor("out_sqnorm", out_sqnorm, (rows,), s)
    return rows, d


def ere_residual(s, eps, sigma, n_samples, out_grad, out_sqnorm):
    """ERE residual, squared norms and gradient w.r.t. the score, with the Triton kernel.

    Args:
        s: [B*N, D] score at the perturbed batch (row b*N + n), float32 or float64.
        eps: [N, D] this step's noise, broadcast over the batch.
        sigma: 0-dim tensor on s's device and dtype (may be a view such as `sig_t[k]`).
        n_samples: N.
        out_grad: [B*N, D] written with 2*sigma*r/N, r = eps[n] + sigma*s.
        out_sqnorm: [B*N] written with sum over D of r^2.

    Returns:
        None (the outputs are written in place).

    Raises:
        ValueError: bad shapes, dtypes, devices or non-contiguous tensors.
        RuntimeError: Triton cannot run on this device (see `use_triton`).
    """
    rows, d = _check(s, eps, sigma, n_samples, out_grad, out_sqnorm)
    require_triton(s.device)
    _ere_residual_kernel[(rows,)](
        s, eps, sigma, out_grad, out_sqnorm, d, N=n_samples, BLOCK=block_size(d), enable_fp_fusion=False
    )


def ere_residual_torch(s, eps, sigma, n_samples, out_grad, out_sqnorm):
    """Torch fallback of `ere_residual`: same arguments, same semantics, no temporaries beyond
    0-dim ones.

    Args, Returns, Raises: as `ere_residual`, without the RuntimeError.
    """
    rows, d = _check(s, eps, sigma, n_samples, out_grad, out_sqnorm)
    torch.mul(s, sigma, out=out_grad)
    out_grad.view(rows // n_samples, n_samples, d).add_(eps)
    # ||r|| squared rather than sum(r*r): no [B*N, D] temporary, a few ulp apart at most.
    torch.linalg.vector_norm(out_grad, dim=1, out=out_sqnorm)
    out_sqnorm.square_()
    out_grad.mul_(2 * sigma).div_(n_samples)
