"""FIR up/down-sampling (StyleGAN2's upfirdn2d) in plain PyTorch.

NCSN++ resamples with a separable FIR filter (score_sde's `fir_kernel`, [1, 3, 3, 1]) instead
of nearest/average pooling. Everything here is ordinary autograd-able PyTorch (no CUDA
extension), runs on any device and dtype, and is differentiable to any order.

The filter is passed in as a prepared 2-D tensor (`fir_filter`): the modules keep it as a
non-persistent buffer, so it follows `.to()` / `.double()` and never needs a host-to-device
copy inside the forward pass (which would break CUDA-graph capture).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["fir_filter", "upfirdn2d", "upsample_2d", "downsample_2d", "upsample_conv_2d", "conv_downsample_2d",
           "naive_upsample_2d", "naive_downsample_2d"]


def fir_filter(taps: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised 2-D filter of separable 1-D taps: outer(k, k) / sum (sums to 1).

    Args:
        taps: the 1-D filter taps, e.g. (1, 3, 3, 1).
        dtype: the dtype of the result.

    Returns:
        A (len(taps), len(taps)) tensor.

    Raises:
        ValueError: taps is empty or sums to zero.
    """
    taps = [float(t) for t in taps]
    total = sum(taps)
    if not taps or total == 0.0:
        raise ValueError(f"fir_kernel must be a non-empty list of taps with a non-zero sum, got {taps}")
    # Built from Python floats so that it also works under a meta default device.
    return torch.tensor([[a * b / total ** 2 for b in taps] for a in taps], dtype=dtype)


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, *, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, filter with `kernel` (true convolution), downsample.

    The same operation as StyleGAN2's `upfirdn2d` with equal x/y factors and pads.

    Args:
        x: (N, C, H, W).
        kernel: (kh, kw) FIR filter.
        up, down: integer factors.
        pad: (before, after) padding of both spatial axes after upsampling; negative crops.

    Returns:
        (N, C, (H * up + pad0 + pad1 - kh) // down + 1, ...).
    """
    n, c, h, w = x.shape
    if up > 1:
        # Zero insertion: each pixel followed by up - 1 zeros along both axes.
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    # conv2d correlates; flipping the filter makes it a convolution. Depthwise: one filter per channel.
    weight = torch.flip(kernel, (0, 1)).to(x.dtype).expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def upsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """FIR upsampling by `factor` (kernel from `fir_filter`; gain factor**2 keeps the mean)."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel * factor ** 2, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """FIR downsampling by `factor` (kernel from `fir_filter`)."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: torch.Tensor, weight: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """FIR upsampling fused with a (odd, square) convolution by `weight` (out, in, k, k).

    A strided transposed convolution does the upsampling and the convolution at once; the FIR
    filter then smooths the result, padded once so that the output is exactly factor x larger.
    """
    conv_k = weight.shape[-1]
    p = (kernel.shape[0] - factor) - (conv_k - 1)
    # conv_transpose2d wants (in, out, k, k); the spatial flip makes it the adjoint of the
    # forward convolution with `weight`, which is what the fused up-conv computes.
    w_t = torch.flip(weight, (2, 3)).transpose(0, 1)
    x = F.conv_transpose2d(x, w_t, stride=factor)
    return upfirdn2d(x, kernel * factor ** 2, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: torch.Tensor, weight: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """A (odd, square) convolution by `weight` fused with FIR downsampling by `factor`."""
    conv_k = weight.shape[-1]
    p = (kernel.shape[0] - factor) + (conv_k - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, weight, stride=factor)


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling (each pixel repeated factor x factor times)."""
    return F.interpolate(x, scale_factor=factor, mode="nearest")


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Average pooling over factor x factor blocks."""
    return F.avg_pool2d(x, factor, stride=factor)
