"""Monte-Carlo reduction g_b = sum_n dL/dy_(b,n), fused with the SAM step that writes the
perturbed batch x + d + sigma*eps_n of the ascent point.

Semantics: `pursamere_fast.reference.mc_reduce_sam`.
"""

import torch

from .common import (
    block_size,
    check_device_scalar,
    check_float_dtype,
    check_nonneg,
    check_norm,
    check_tensor,
    div_rn,
    require_triton,
    sqrt_rn,
    store_perturbed,
    tl,
    triton_jit,
)


@triton_jit
def _mc_reduce_sam_kernel(
    gy_ptr,  # [B, N, D] dL/dy per perturbed sample
    x_ptr,  # [B, D] current iterate (read when WRITE_Y)
    eps_ptr,  # [N, D] this step's noise (read when WRITE_Y)
    sigma_ptr,  # [] this step's sigma (read when WRITE_Y)
    g_ptr,  # [B, D] out: sum over n of gy, in index order
    y_ptr,  # [B, N, D] out: x + d + sigma*eps (written when WRITE_Y)
    D,
    N: tl.constexpr,  # n_samples: a config constant
    RADIUS: tl.constexpr,  # SAM radius: a config constant, exact in fp64 as a constexpr
    L2: tl.constexpr,
    WRITE_Y: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Grid (B, P): program (b, p) handles blocks p, p + P, ... of image b. The launcher uses
    # P = 1 when the l2 SAM step needs the whole image's norm before writing y, else one
    # program per block.
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * BLOCK
    step = tl.num_programs(1) * BLOCK
    cols = tl.arange(0, BLOCK)
    sq = tl.zeros([BLOCK], dtype=g_ptr.dtype.element_ty)
    for start in range(first, D, step):
        offs = start + cols
        mask = offs < D
        g = tl.zeros([BLOCK], dtype=g_ptr.dtype.element_ty)
        for n in range(N):
            g += tl.load(gy_ptr + (b * N + n) * D + offs, mask=mask, other=0.0)
        tl.store(g_ptr + b * D + offs, g, mask=mask)
        if L2:
            sq += g * g
        elif WRITE_Y:
            # torch.sign: 0 at 0 and at NaN (g keeps the NaN for the loop's checks).
            sign = (g > 0).to(g.dtype) - (g < 0).to(g.dtype)
            x = tl.load(x_ptr + b * D + offs, mask=mask, other=0.0)
            store_perturbed(y_ptr, eps_ptr, x + RADIUS * sign, tl.load(sigma_ptr), b, offs, mask, D, N)
    if L2 and WRITE_Y:
        # The floor as a 0-d tensor of g's dtype: a Python float beside a 0-d float64 value is
        # made float32 first by Triton 3.6 (1e-12 became 9.99999996e-13; the float64 variant's
        # TTIR constants are checked by tests/test_kernel_compile.py).
        floor = tl.full((), 1e-12, g_ptr.dtype.element_ty)
        den = tl.maximum(sqrt_rn(tl.sum(sq, axis=0)), floor)
        sigma = tl.load(sigma_ptr)
        # g was stored above by other threads of this program; the barrier makes it visible.
        tl.debug_barrier()
        for start in range(first, D, step):
            offs = start + cols
            mask = offs < D
            g = tl.load(g_ptr + b * D + offs, mask=mask, other=0.0)
            x = tl.load(x_ptr + b * D + offs, mask=mask, other=0.0)
            d = div_rn(RADIUS * g, den)
            store_perturbed(y_ptr, eps_ptr, x + d, sigma, b, offs, mask, D, N)


def _check(gy, x, eps, sigma, radius, norm, out_g, out_y):
    check_float_dtype("gy", gy)
    if gy.dim() != 3:
        raise ValueError(f"gy must be 3-D [B, N, D], got shape {tuple(gy.shape)}")
    b, n, d = gy.shape
    check_tensor("gy", gy, (b, n, d), gy)
    check_tensor("x", x, (b, d), gy)
    check_tensor("eps", eps, (n, d), gy)
    check_device_scalar("sigma", sigma, gy)
    radius = check_nonneg("radius", radius)
    check_norm(norm)
    check_tensor("out_g", out_g, (b, d), gy)
    if out_y is not None:
        check_tensor("out_y", out_y, (b, n, d), gy)
    return b, n, d, radius


def mc_reduce_sam(gy, x, eps, sigma, radius, norm, out_g, out_y=None):
    """Sum dL/dy over the N samples and, if `out_y` is given, write the SAM batch; Triton kernel.

    Args:
        gy: [B, N, D] dL/dy per perturbed sample, float32 or float64.
        x: [B, D] current iterate.
        eps: [N, D] this step's noise.
        sigma: 0-dim tensor on gy's device and dtype (may be a view such as `sig_t[k]`).
        radius: SAM radius r >= 0, a Python number (config constant; one compile per value).
        norm: "linf" (d = r*sign(g)) or "l2" (d = r*g/max(||g_b||_2, 1e-12) per image).
        out_g: [B, D] written with g = sum over n of gy[:, n], in index order.
        out_y: optional [B, N, D] written with x[b] + d[b] + sigma*eps[n] (x + d not clamped).

    Returns:
        None (the outputs are written in place).

    Raises:
        ValueError: bad shapes, dtypes, devices, radius or norm.
        RuntimeError: Triton cannot run on this device (see `use_triton`).
    """
    b, n, d, radius = _check(gy, x, eps, sigma, radius, norm, out_g, out_y)
    require_triton(gy.device)
    write_y = out_y is not None
    l2 = write_y and norm == "l2"
    block = block_size(d)
    grid = (b, 1 if l2 else -(-d // block))
    _mc_reduce_sam_kernel[grid](
        gy, x, eps, sigma, out_g, out_g if out_y is None else out_y, d,
        N=n, RADIUS=radius if write_y else 0.0, L2=l2, WRITE_Y=write_y, BLOCK=block, enable_fp_fusion=False,
    )  # fmt: skip


def mc_reduce_sam_torch(gy, x, eps, sigma, radius, norm, out_g, out_y=None):
    """Torch fallback of `mc_reduce_sam`: same arguments and semantics. Temporaries: d [B, D]
    and sigma*eps [N, D] when `out_y` is given, never one of the batch's size [B, N, D].

    Args, Returns, Raises: as `mc_reduce_sam`, without the RuntimeError.
    """
    b, n, d, radius = _check(gy, x, eps, sigma, radius, norm, out_g, out_y)
    out_g.copy_(gy[:, 0])
    for i in range(1, n):
        out_g.add_(gy[:, i])
    if out_y is None:
        return
    if norm == "linf":
        step = torch.sign(out_g).mul_(radius)
    else:
        den = torch.linalg.vector_norm(out_g, dim=1, keepdim=True).clamp_min_(1e-12)
        step = torch.mul(out_g, radius).div_(den)
    torch.add(step.add_(x).unsqueeze(1), torch.mul(eps, sigma).unsqueeze(0), out=out_y)
