"""Adam step + projection onto the rho-ball around x_adv + clamp to [0, 1], fused; optionally
writes the next step's perturbed batch x + sigma_next * eps_next.

Semantics: `pursamere_fast.reference.adam_project`.
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
def _clamp(x, lo, hi):
    # torch.clamp(x, lo, hi) = min(max(x, lo), hi); NaN propagates so the loop's NaN check sees it.
    x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)


@triton_jit
def _adam_project_kernel(
    x_ptr,  # [B, D] iterate, updated in place
    x_adv_ptr,  # [B, D] centre of the ball
    m_ptr,  # [B, D] first moment, updated in place
    v_ptr,  # [B, D] second moment, updated in place
    g_ptr,  # [B, D] gradient
    lr_ptr,  # [] lr_k
    bc1_ptr,  # [] 1 - beta1^(k+1)
    bc2_ptr,  # [] 1 - beta2^(k+1)
    y_ptr,  # [B, N, D] out: x_new + sigma_next*eps_next (written when WRITE_Y)
    eps_ptr,  # [N, D] next step's noise (read when WRITE_Y)
    sigma_ptr,  # [] next step's sigma (read when WRITE_Y)
    D,
    N: tl.constexpr,
    # Config constants as constexprs: a Python float runtime argument would reach the kernel
    # as fp32 and break float64 runs; one compile per config is the price.
    BETA1: tl.constexpr,
    BETA2: tl.constexpr,
    ADAM_EPS: tl.constexpr,
    RHO: tl.constexpr,
    L2: tl.constexpr,
    WRITE_Y: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Grid (B, P): program (b, p) handles blocks p, p + P, ... of image b; P = 1 for l2, whose
    # projection needs the whole image's ||x - x_adv|| first.
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * BLOCK
    step = tl.num_programs(1) * BLOCK
    cols = tl.arange(0, BLOCK)
    lr = tl.load(lr_ptr)
    bc1 = tl.load(bc1_ptr)
    bc2 = tl.load(bc2_ptr)
    sq = tl.zeros([BLOCK], dtype=lr.dtype)
    for start in range(first, D, step):
        offs = start + cols
        mask = offs < D
        idx = b * D + offs
        x = tl.load(x_ptr + idx, mask=mask, other=0.0)
        xa = tl.load(x_adv_ptr + idx, mask=mask, other=0.0)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0)
        m = BETA1 * tl.load(m_ptr + idx, mask=mask, other=0.0) + (1 - BETA1) * g
        v = BETA2 * tl.load(v_ptr + idx, mask=mask, other=0.0) + (1 - BETA2) * (g * g)
        tl.store(m_ptr + idx, m, mask=mask)
        tl.store(v_ptr + idx, v, mask=mask)
        x = x - div_rn(lr * div_rn(m, bc1), sqrt_rn(div_rn(v, bc2)) + ADAM_EPS)
        if L2:
            # Unprojected x parked in place until the norm is known.
            tl.store(x_ptr + idx, x, mask=mask)
            diff = x - xa
            sq += diff * diff
        else:
            x = _clamp(_clamp(x, xa - RHO, xa + RHO), 0.0, 1.0)
            tl.store(x_ptr + idx, x, mask=mask)
            if WRITE_Y:
                store_perturbed(y_ptr, eps_ptr, x, tl.load(sigma_ptr), b, offs, mask, D, N)
    if L2:
        # rho and the floor as 0-d tensors of the data's dtype: a Python float beside a 0-d
        # float64 value is made float32 first by Triton 3.6 (rho = 16/255 became
        # 0.062745101749897, 1e-12 became 9.99999996e-13; the float64 variant's TTIR constants
        # are checked by tests/test_kernel_compile.py).
        rho = tl.full((), RHO, lr.dtype)
        nrm = sqrt_rn(tl.sum(sq, axis=0))
        factor = div_rn(rho, tl.maximum(nrm, tl.full((), 1e-12, lr.dtype)))
        # x was stored above by other threads of this program; the barrier makes it visible.
        tl.debug_barrier()
        for start in range(first, D, step):
            offs = start + cols
            mask = offs < D
            idx = b * D + offs
            x = tl.load(x_ptr + idx, mask=mask, other=0.0)
            xa = tl.load(x_adv_ptr + idx, mask=mask, other=0.0)
            x = tl.where(nrm > rho, xa + (x - xa) * factor, x)
            x = _clamp(x, 0.0, 1.0)
            tl.store(x_ptr + idx, x, mask=mask)
            if WRITE_Y:
                store_perturbed(y_ptr, eps_ptr, x, tl.load(sigma_ptr), b, offs, mask, D, N)


def _check(x, x_adv, m, v, g, lr, bc1, bc2, beta1, beta2, adam_eps, rho, norm, y_next, eps_next, sigma_next):
    check_float_dtype("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [B, D], got shape {tuple(x.shape)}")
    b, d = x.shape
    for name, t in (("x", x), ("x_adv", x_adv), ("m", m), ("v", v), ("g", g)):
        check_tensor(name, t, (b, d), x)
    for name, t in (("lr", lr), ("bc1", bc1), ("bc2", bc2)):
        check_device_scalar(name, t, x)
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if check_nonneg(name, beta) >= 1:
            raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    adam_eps = check_nonneg("adam_eps", adam_eps)
    rho = check_nonneg("rho", rho)
    check_norm(norm)
    given = [t is not None for t in (y_next, eps_next, sigma_next)]
    if any(given) and not all(given):
        raise ValueError(
            f"y_next, eps_next and sigma_next go together; got y_next={given[0]}, eps_next={given[1]}, "
            f"sigma_next={given[2]} (True = given)"
        )
    n = 1
    if y_next is not None:
        if y_next.dim() != 3:
            raise ValueError(f"y_next must be 3-D [B, N, D], got shape {tuple(y_next.shape)}")
        n = y_next.shape[1]
        check_tensor("y_next", y_next, (b, n, d), x)
        check_tensor("eps_next", eps_next, (n, d), x)
        check_device_scalar("sigma_next", sigma_next, x)
    return b, n, d, float(beta1), float(beta2), adam_eps, rho


def adam_project(
    x, x_adv, m, v, g, lr, bc1, bc2, *, beta1, beta2, adam_eps, rho, norm, y_next=None, eps_next=None, sigma_next=None
):
    """Adam step, projection onto the rho-ball around x_adv and clamp to [0, 1]; Triton kernel.

    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;  x = x - lr*(m/bc1)/(sqrt(v/bc2) + adam_eps);
    linf: x = clamp(x, x_adv - rho, x_adv + rho);  l2: x = x_adv + (x - x_adv)*rho/||x - x_adv||_2
    where that norm exceeds rho (x is left as is inside the ball);  then x = clamp(x, 0, 1).

    Args:
        x, m, v: [B, D] iterate and Adam moments, float32 or float64, updated in place.
        x_adv: [B, D] centre of the ball.  g: [B, D] gradient.
        lr, bc1, bc2: 0-dim tensors on x's device and dtype: lr_k, 1-beta1^(k+1), 1-beta2^(k+1).
        beta1, beta2, adam_eps, rho: Python numbers (config constants; one compile per config).
        norm: "linf" or "l2".
        y_next, eps_next, sigma_next: optional, all or none: [B, N, D] written with
            x_new[b] + sigma_next*eps_next[n]; [N, D] next noise; 0-dim next sigma.

    Returns:
        None (the outputs are written in place).

    Raises:
        ValueError: bad shapes, dtypes, devices, constants or norm.
        RuntimeError: Triton cannot run on this device (see `use_triton`).
    """
    b, n, d, beta1, beta2, adam_eps, rho = _check(
        x, x_adv, m, v, g, lr, bc1, bc2, beta1, beta2, adam_eps, rho, norm, y_next, eps_next, sigma_next
    )
    require_triton(x.device)
    write_y = y_next is not None
    l2 = norm == "l2"
    block = block_size(d)
    grid = (b, 1 if l2 else -(-d // block))
    _adam_project_kernel[grid](
        x, x_adv, m, v, g, lr, bc1, bc2,
        y_next if write_y else x, eps_next if write_y else x, sigma_next if write_y else lr, d,
        N=n, BETA1=beta1, BETA2=beta2, ADAM_EPS=adam_eps, RHO=rho, L2=l2, WRITE_Y=write_y, BLOCK=block,
        enable_fp_fusion=False,
    )  # fmt: skip


def adam_project_torch(
    x, x_adv, m, v, g, lr, bc1, bc2, *, beta1, beta2, adam_eps, rho, norm, y_next=None, eps_next=None, sigma_next=None
):
    """Torch fallback of `adam_project`: same arguments, semantics and operation order.
    Temporaries: two [B, D] (the Adam step keeps that order without touching m or v) plus
    [N, D] for y_next, never one of the batch's size [B, N, D].

    Args, Returns, Raises: as `adam_project`, without the RuntimeError.
    """
    _check(x, x_adv, m, v, g, lr, bc1, bc2, beta1, beta2, adam_eps, rho, norm, y_next, eps_next, sigma_next)
    t1 = torch.mul(g, 1 - beta1)
    m.mul_(beta1).add_(t1)
    t2 = torch.mul(g, g).mul_(1 - beta2)
    v.mul_(beta2).add_(t2)
    torch.div(m, bc1, out=t1).mul_(lr)
    torch.div(v, bc2, out=t2).sqrt_().add_(adam_eps)
    x.sub_(t1.div_(t2))
    if norm == "linf":
        x.clamp_(torch.sub(x_adv, rho, out=t1), torch.add(x_adv, rho, out=t2))
    else:
        diff = torch.sub(x, x_adv, out=t1)
        nrm = torch.linalg.vector_norm(diff, dim=1, keepdim=True)
        # A tensor numerator: `rho / tensor` would compute rho * (1 / tensor), rounding twice.
        factor = torch.full_like(nrm, rho).div_(nrm.clamp_min(1e-12))
        torch.where(nrm > rho, diff.mul_(factor).add_(x_adv), x, out=x)
    x.clamp_(0.0, 1.0)
    if y_next is not None:
        torch.add(x.unsqueeze(1), torch.mul(eps_next, sigma_next).unsqueeze(0), out=y_next)
