"""Building blocks of score_sde's NCSN++ / DDPM++ and DDPM networks.

Attribute names (`Conv_0`, `GroupNorm_1`, `NIN_2`, `Dense_0`, ...) and the order in which
each block registers its parameters are those of the official code, because checkpoints are
matched by state_dict key and the EMA shadow is a list in `parameters()` order.

Initialisation follows the official one (DDPM's fan-average uniform variance scaling, with
`init_scale` for the layers that start near zero); it only matters for networks that are
trained here, since a loaded checkpoint overwrites every parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import upfirdn

_SQRT2 = math.sqrt(2.0)


def default_init_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """In place: uniform variance scaling with fan_avg (DDPM's init); scale 0 means 1e-10.

    Fans are read with axis 1 as "in" and axis 0 as "out", as the official initialiser does
    for every weight (NIN's (in, out) matrix included: fan_avg is symmetric anyway).
    """
    scale = 1e-10 if scale == 0 else scale
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive / 2
    bound = math.sqrt(3 * scale / fan_avg)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv(in_ch: int, out_ch: int, kernel: int = 3, *, stride: int = 1, padding: int | None = None,
         init_scale: float = 1.0) -> nn.Conv2d:
    """A biased Conv2d with DDPM's init (padding k // 2 unless given)."""
    layer = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2 if padding is None else padding)
    default_init_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def dense(in_features: int, out_features: int) -> nn.Linear:
    """A Linear with DDPM's init."""
    layer = nn.Linear(in_features, out_features)
    default_init_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def ncsnpp_groups(channels: int) -> int:
    """NCSN++'s GroupNorm group count: min(C // 4, 32)."""
    return min(channels // 4, 32)


def ddpm_groups(channels: int) -> int:
    """DDPM's GroupNorm group count: always 32."""
    return 32


def group_norm(channels: int, groups: Callable[[int], int]) -> nn.GroupNorm:
    """GroupNorm with eps 1e-6 (the official value) and the arch's group count."""
    return nn.GroupNorm(groups(channels), channels, eps=1e-6)


def timestep_embedding(labels: torch.Tensor, dim: int, max_positions: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal embedding of real-valued labels: [sin(l * f_i), cos(l * f_i)].

    Frequencies f_i = max_positions^(-i / (dim/2 - 1)). The official code computes in float32
    whatever the input; here float64 labels stay float64 (so a float64 run is float64
    throughout) and anything narrower is computed in float32, as the official code does.

    Args:
        labels: (M,) time labels (999 t for the continuous VP models).
        dim: embedding width; odd widths get one zero column.

    Returns:
        (M, dim) tensor in float32 or float64.
    """
    dtype = torch.float64 if labels.dtype == torch.float64 else torch.float32
    half = dim // 2
    step = math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=labels.device) * -step)
    args = labels.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class FourierEmbedding(nn.Module):
    """Random Fourier features of log(sigma): [sin(2 pi l W), cos(2 pi l W)].

    W is a fixed random projection: a Parameter with requires_grad=False (so it is in the
    state_dict as `W` but not in the EMA shadow, exactly as in the official code).
    """

    def __init__(self, size: int, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(size) * scale, requires_grad=False)

    def forward(self, log_sigma: torch.Tensor) -> torch.Tensor:
        # Same operation order as the official code, so float32 phases (up to ~1e3 rad for
        # scale 16) round the same way.
        proj = log_sigma[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class NIN(nn.Module):
    """A 1x1 convolution stored as an (in, out) matrix `W` and bias `b` (network-in-network)."""

    def __init__(self, in_dim: int, out_dim: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(default_init_(torch.empty(in_dim, out_dim), init_scale))
        self.b = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x.permute(0, 2, 3, 1), self.W) + self.b
        return y.permute(0, 3, 1, 2)


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions, one head, residual (optionally / sqrt 2)."""

    def __init__(self, channels: int, *, groups: Callable[[int], int], skip_rescale: bool = False,
                 init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels, groups)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.GroupNorm_0(x)
        q = self.NIN_0(hn).reshape(b, c, h * w)
        k = self.NIN_1(hn).reshape(b, c, h * w)
        v = self.NIN_2(hn).reshape(b, c, h * w)
        # Plain matmul + softmax (not scaled_dot_product_attention): differentiable twice on
        # every device, which grad_mode="full" needs.
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * (c ** -0.5), dim=-1)  # (b, query, key)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        out = self.NIN_3(out)
        return (x + out) / _SQRT2 if self.skip_rescale else x + out


class Combine(nn.Module):
    """Merge the input pyramid into the trunk: 1x1 conv of the pyramid, then sum or concat."""

    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        self.Conv_0 = conv(dim1, dim2, 1)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv_0(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y


class FIRConv2d(nn.Module):
    """A 3x3 (odd k) convolution fused with FIR up- or down-sampling (`weight`, `bias`)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, up: bool = False, down: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.weight = nn.Parameter(default_init_(torch.empty(out_ch, in_ch, kernel, kernel)))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("fir_filter", upfirdn.fir_filter(fir_kernel), persistent=False)
        self.up, self.down = up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = upfirdn.upsample_conv_2d(x, self.weight, self.fir_filter)
        elif self.down:
            x = upfirdn.conv_downsample_2d(x, self.weight, self.fir_filter)
        else:
            x = F.conv2d(x, self.weight, padding=self.weight.shape[-1] // 2)
        return x + self.bias.reshape(1, -1, 1, 1)


class Upsample(nn.Module):
    """2x upsampling: nearest (+ 3x3 conv `Conv_0`) or FIR (+ fused conv `Conv2d_0`)."""

    def __init__(self, in_ch: int, out_ch: int | None = None, *, with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and fir:
            self.Conv2d_0 = FIRConv2d(in_ch, out_ch, 3, up=True, fir_kernel=fir_kernel)
        elif with_conv:
            self.Conv_0 = conv(in_ch, out_ch)
        if fir:
            self.register_buffer("fir_filter", upfirdn.fir_filter(fir_kernel), persistent=False)
        self.fir, self.with_conv = fir, with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else upfirdn.upsample_2d(x, self.fir_filter)
        h = upfirdn.naive_upsample_2d(x)
        return self.Conv_0(h) if self.with_conv else h


class Downsample(nn.Module):
    """2x downsampling: average pool or strided 3x3 conv `Conv_0`, or FIR (+ fused conv `Conv2d_0`)."""

    def __init__(self, in_ch: int, out_ch: int | None = None, *, with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and fir:
            self.Conv2d_0 = FIRConv2d(in_ch, out_ch, 3, down=True, fir_kernel=fir_kernel)
        elif with_conv:
            self.Conv_0 = conv(in_ch, out_ch, stride=2, padding=0)
        if fir:
            self.register_buffer("fir_filter", upfirdn.fir_filter(fir_kernel), persistent=False)
        self.fir, self.with_conv = fir, with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else upfirdn.downsample_2d(x, self.fir_filter)
        if self.with_conv:
            # TensorFlow's 'SAME' padding for a stride-2 3x3 conv on an even size: one pixel after.
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
        return upfirdn.naive_downsample_2d(x)


class ResBlockDDPM(nn.Module):
    """DDPM's residual block: norm-act-conv, + time bias, norm-act-dropout-conv, skip.

    The skip is a 1x1 `NIN_0` (or a 3x3 `Conv_2` with conv_shortcut) when channels change.
    DDPM++ divides the sum by sqrt 2 (skip_rescale); DDPM does not.
    """

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None, *, temb_dim: int,
                 groups: Callable[[int], int], dropout: float = 0.1, skip_rescale: bool = False,
                 init_scale: float = 0.0, conv_shortcut: bool = False):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch, groups)
        self.Conv_0 = conv(in_ch, out_ch)
        self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch, groups)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = conv(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.act = act
        self.skip_rescale = skip_rescale
        self.in_ch, self.out_ch, self.conv_shortcut = in_ch, out_ch, conv_shortcut

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class ResBlockBigGAN(nn.Module):
    """BigGAN-style residual block that can also resample (up or down) both of its paths.

    The skip path gets a 1x1 `Conv_2` whenever channels change or the block resamples.
    """

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None, *, temb_dim: int,
                 groups: Callable[[int], int], up: bool = False, down: bool = False, dropout: float = 0.1,
                 fir: bool = False, fir_kernel: Sequence[float] = (1, 3, 3, 1), skip_rescale: bool = True,
                 init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch, groups)
        self.Conv_0 = conv(in_ch, out_ch)
        self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch, groups)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv(out_ch, out_ch, init_scale=init_scale)
        self.has_skip_conv = in_ch != out_ch or up or down
        if self.has_skip_conv:
            self.Conv_2 = conv(in_ch, out_ch, 1)
        if fir and (up or down):
            self.register_buffer("fir_filter", upfirdn.fir_filter(fir_kernel), persistent=False)
        self.act = act
        self.up, self.down, self.fir = up, down, fir
        self.skip_rescale = skip_rescale

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return upfirdn.upsample_2d(x, self.fir_filter) if self.fir else upfirdn.naive_upsample_2d(x)
        if self.down:
            return upfirdn.downsample_2d(x, self.fir_filter) if self.fir else upfirdn.naive_downsample_2d(x)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.GroupNorm_0(x))
        h, x = self._resample(h), self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.has_skip_conv:
            x = self.Conv_2(x)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


def activation(name: str) -> nn.Module:
    """The config's `model.nonlinearity` as a module.

    Raises:
        ValueError: an unknown name.
    """
    acts = {"elu": nn.ELU, "relu": nn.ReLU, "swish": nn.SiLU}
    key = str(name).lower()
    if key == "lrelu":
        return nn.LeakyReLU(negative_slope=0.2)
    if key not in acts:
        raise ValueError(f"model.nonlinearity must be one of elu, relu, lrelu, swish; got {name!r}")
    return acts[key]()
