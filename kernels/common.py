"""What the op kernels share: the one gate that decides whether Triton runs, the block-size
helper, the `@triton.jit` helpers every kernel calls, and the launchers' argument checks.

It must import on machines without Triton (non-Linux): `triton_jit` is then a stand-in whose
kernels raise `RuntimeError` when launched, and the `*_torch` fallbacks still work. Nothing
here queries the GPU at import time. The op files import from here and the package's
`__init__` re-exports the public names, so there is no import cycle.
"""

import os
import types

import torch

from .. import checks

try:
    import triton
    import triton.language as tl

    _TRITON = True
    triton_jit = triton.jit
except ImportError:
    _TRITON = False
    triton = None
    # Kernel signatures must spell `tl.constexpr` (the interpreter matches the annotation's
    # text), so without Triton `tl` is a stand-in that lets them evaluate; no kernel runs.
    tl = types.SimpleNamespace(constexpr=None)

    def triton_jit(fn):
        """Stand-in decorator without Triton: the kernel is never launched (launchers check first)."""

        def _unavailable(*args, **kwargs):
            raise RuntimeError(f"{fn.__name__} needs Triton, which is not installed")

        return _unavailable


# tl.arange needs a power of two. 1024 caps the per-program tile (8 fp32 values per thread at
# 4 warps) so a long row is looped over instead of spilling registers; below 16 a block leaves
# most of a warp idle and only adds compiled variants. Not tuned on a GPU yet. Tests lower
# MAX_BLOCK (read at call time) so that the loops and tail masks run at small sizes.
MAX_BLOCK = 1024
MIN_BLOCK = 16


def block_size(n: int) -> int:
    """Block size for a loop over `n` elements: the next power of two, clamped to
    [MIN_BLOCK, MAX_BLOCK].

    Args:
        n: number of elements a program loops over (e.g. D = C*H*W).

    Returns:
        A power of two.
    """
    return max(MIN_BLOCK, min(MAX_BLOCK, _next_power_of_2(n)))


def _next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1); same as `triton.next_power_of_2`, without Triton."""
    return 1 << max(0, int(n) - 1).bit_length()


def triton_available() -> bool:
    """Whether Triton could be imported."""
    return _TRITON


def use_triton(device) -> bool:
    """Whether the Triton launchers can run on `device`.

    Args:
        device: a `torch.device` (or a string such as "cuda:0").

    Returns:
        True when Triton is importable and the device is CUDA, or TRITON_INTERPRET=1 (the
        interpreter, which runs kernels on CPU tensors; slow, for tests).
    """
    device = torch.device(device)
    return _TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def require_triton(device) -> None:
    """Raise `RuntimeError` unless `use_triton(device)`; called by every launcher."""
    if not _TRITON:
        raise RuntimeError("Triton is not installed: use the *_torch fallbacks (backend='torch')")
    if not use_triton(device):
        raise RuntimeError(
            f"Triton kernels need CUDA tensors or TRITON_INTERPRET=1 set before import; got device {device}"
        )


# Helpers shared by the op kernels. Every launch passes enable_fp_fusion=False, and fp32 divisions
# and square roots go through div_rn / sqrt_rn (plain `/` and tl.sqrt are approximate for fp32 on
# NVIDIA), so each elementwise step is one correctly rounded IEEE op, in the fallback's order.


@triton_jit
def div_rn(a, b):
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton_jit
def sqrt_rn(a):
    if a.dtype == tl.float32:
        return tl.sqrt_rn(a)
    else:
        return tl.sqrt(a)


@triton_jit
def store_perturbed(
    y_ptr,  # [B, N, D] out: y[b, n] = base[b] + sigma * eps[n]
    eps_ptr,  # [N, D] noise
    base,  # [BLOCK] values of base[b] at offs
    sigma,  # [] noise level
    b,  # int64 image index
    offs,  # [BLOCK] int32 column offsets
    mask,  # [BLOCK] offs < D
    D,
    N: tl.constexpr,
):
    for n in range(N):
        e = tl.load(eps_ptr + n * D + offs, mask=mask, other=0.0)
        tl.store(y_ptr + (b * N + n) * D + offs, base + sigma * e, mask=mask)


def check_device_scalar(name: str, t, like: torch.Tensor) -> None:
    """Validate a 0-dim device scalar (sigma, lr, ...) against a data tensor `like`."""
    if not isinstance(t, torch.Tensor) or t.dim() != 0:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 0-dim tensor (a device scalar, never a Python float), got {got}")
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} must have dtype {like.dtype} on {like.device}, got {t.dtype} on {t.device}")


def check_tensor(name: str, t, shape: tuple, like: torch.Tensor) -> None:
    """Validate a contiguous data tensor of `shape` with the dtype and device of `like`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} must have dtype {like.dtype} on {like.device}, got {t.dtype} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def check_float_dtype(name: str, t) -> None:
    """The ops run in float32 or float64."""
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float64):
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a float32 or float64 tensor, got {got}")


def check_norm(norm) -> None:
    checks.choice("norm", norm, ("linf", "l2"))


def check_nonneg(name: str, value) -> float:
    """A Python-number config constant >= 0 (never a tensor: it is baked into the launch)."""
    return checks.real(name, value, 0.0)
