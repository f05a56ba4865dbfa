"""NCSNv2 (Song & Ermon, 2020) with the official repository's architecture and state-dict layout.

Written to match ermongroup/ncsnv2 (`models/ncsnv2.py`, `models/layers.py`,
`models/normalization.py`) for the CIFAR-10/CelebA model `NCSNv2(config)` with
InstanceNorm++ and ELU: same layers, same parameter and buffer names, same arithmetic order
where it changes float results, so that official checkpoints load unchanged and reproduce
the official outputs (tests/fixtures/ncsnv2_cifar10_ngf16, to 1e-5).

Two ways to evaluate the network:
- `model(x, labels)`: the official forward, body(x) / sigmas[labels] on the trained ladder.
- `model.score(y, sigma)`: body(y) / sigma for any continuous sigma of shape (M,). The body
  takes no noise level (NCSNv2 is noise-unconditional), so this is exact, not an
  interpolation. `NCSNv2Score(model)` wraps it as the `score(y, sigma)` nn.Module that
  `purify` and `Purifier` take.

`load_ncsnv2` reads the official `checkpoint.pth` (`[model_state, optim_state, epoch, step,
ema_shadow]`) with `torch.load(weights_only=True)`; `ncsnv2_score(path)` reads the architecture
from the file as well and returns the `NCSNv2Score` (the score factory of the CIFAR-10 protocol's
configs and of `train-classifier --purify-score`).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import checks

__all__ = ["NCSNv2", "NCSNv2Score", "load_ncsnv2", "ncsnv2_score"]


class InstanceNorm2dPlus(nn.Module):
    """InstanceNorm++ (NCSN): instance norm plus a term that restores the per-channel means.

    The channel means are standardised across channels with the unbiased `torch.var`, as
    the official code does (so it needs at least two channels).
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.alpha = nn.Parameter(torch.empty(num_features).normal_(1, 0.02))
        self.gamma = nn.Parameter(torch.empty(num_features).normal_(1, 0.02))
        self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = torch.mean(x, dim=(2, 3))
        m = torch.mean(means, dim=-1, keepdim=True)
        v = torch.var(means, dim=-1, keepdim=True)
        means = (means - m) / torch.sqrt(v + 1e-5)
        h = F.instance_norm(x, eps=1e-5)
        h = h + means[..., None, None] * self.alpha[..., None, None]
        return self.gamma.view(1, -1, 1, 1) * h + self.beta.view(1, -1, 1, 1)


def _conv3x3(in_ch: int, out_ch: int, *, bias: bool = True, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=bias)


class ConvMeanPool(nn.Module):
    """Conv (same padding) then 2x2 mean pooling.

    `adjust_padding` zero-pads one row/column on the top/left first, which maps an odd side
    (7) to an even one (8) before pooling; the official code wraps the conv in a Sequential
    for it, hence the `conv.1.*` parameter names in that case.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, adjust_padding: bool = False):
        super().__init__()
        conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
        self.conv = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), conv) if adjust_padding else conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        # Summed in the official order so that results match bit for bit.
        return (h[:, :, ::2, ::2] + h[:, :, 1::2, ::2] + h[:, :, ::2, 1::2] + h[:, :, 1::2, 1::2]) / 4.0


class ResidualBlock(nn.Module):
    """Pre-activation residual block: norm, ELU, conv, norm, ELU, conv, plus a shortcut.

    As in the official code, `resample="down"` halves the resolution only when
    `dilation == 1` (ConvMeanPool); a dilated "down" block keeps the resolution and only
    switches to a conv shortcut, so `adjust_padding` has an effect only without dilation.
    """

    def __init__(self, in_ch: int, out_ch: int, *, resample: str | None = None, dilation: int = 1,
                 adjust_padding: bool = False):
        super().__init__()
        assert resample in (None, "down")
        self.resample = resample
        self.in_ch = in_ch
        self.out_ch = out_ch
        # Modules are registered in the official order so that state_dict() lists keys alike.
        if resample == "down":
            self.conv1 = _conv3x3(in_ch, in_ch, dilation=dilation)
            self.normalize2 = InstanceNorm2dPlus(in_ch)
            if dilation > 1:
                self.conv2 = _conv3x3(in_ch, out_ch, dilation=dilation)
                self.shortcut = _conv3x3(in_ch, out_ch, dilation=dilation)
            else:
                self.conv2 = ConvMeanPool(in_ch, out_ch, 3, adjust_padding=adjust_padding)
                self.shortcut = ConvMeanPool(in_ch, out_ch, 1, adjust_padding=adjust_padding)
        else:
            self.conv1 = _conv3x3(in_ch, out_ch, dilation=dilation)
            self.normalize2 = InstanceNorm2dPlus(out_ch)
            self.conv2 = _conv3x3(out_ch, out_ch, dilation=dilation)
            if in_ch != out_ch:
                self.shortcut = (_conv3x3(in_ch, out_ch, dilation=dilation) if dilation > 1
                                 else nn.Conv2d(in_ch, out_ch, 1))
        self.normalize1 = InstanceNorm2dPlus(in_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.elu(self.normalize1(x)))
        h = self.conv2(F.elu(self.normalize2(h)))
        if self.resample is None and self.in_ch == self.out_ch:
            return x + h
        return self.shortcut(x) + h


class RCUBlock(nn.Module):
    """Residual conv units: n_blocks x (n_stages x (ELU, bias-free conv3x3)) with identity skips."""

    def __init__(self, features: int, n_blocks: int, n_stages: int):
        super().__init__()
        self._names = tuple(tuple(f"{i + 1}_{j + 1}_conv" for j in range(n_stages)) for i in range(n_blocks))
        for block in self._names:
            for name in block:
                self.add_module(name, _conv3x3(features, features, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self._names:
            residual = x
            for name in block:
                x = getattr(self, name)(F.elu(x))
            x = x + residual
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion: conv3x3 each input, resize bilinearly (align_corners) and sum."""

    def __init__(self, in_planes: Sequence[int], features: int):
        super().__init__()
        self.convs = nn.ModuleList(_conv3x3(c, features) for c in in_planes)

    def forward(self, xs: Sequence[torch.Tensor], shape: torch.Size) -> torch.Tensor:
        total = None
        for conv, x in zip(self.convs, xs):
            h = conv(x)
            # Resizing to the same size is an exact copy; skipping it saves a kernel per input.
            if h.shape[2:] != shape:
                h = F.interpolate(h, size=shape, mode="bilinear", align_corners=True)
            total = h if total is None else total + h
        return total


class CRPBlock(nn.Module):
    """Chained residual pooling: ELU, then n_stages x (maxpool 5x5 stride 1, conv3x3) summed in."""

    def __init__(self, features: int, n_stages: int):
        super().__init__()
        self.convs = nn.ModuleList(_conv3x3(features, features, bias=False) for _ in range(n_stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.elu(x)
        path = x
        for conv in self.convs:
            path = conv(F.max_pool2d(path, kernel_size=5, stride=1, padding=2))
            x = path + x
        return x


class RefineBlock(nn.Module):
    """RefineNet block: RCU per input, fusion (MSF) of several inputs, CRP, output RCU."""

    def __init__(self, in_planes: Sequence[int], features: int, *, start: bool = False, end: bool = False):
        super().__init__()
        self.adapt_convs = nn.ModuleList(RCUBlock(c, 2, 2) for c in in_planes)
        self.output_convs = RCUBlock(features, 3 if end else 1, 2)
        if not start:
            self.msf = MSFBlock(in_planes, features)
        self.crp = CRPBlock(features, 2)

    def forward(self, xs: Sequence[torch.Tensor], shape: torch.Size) -> torch.Tensor:
        hs = [adapt(x) for adapt, x in zip(self.adapt_convs, xs)]
        h = self.msf(hs, shape) if len(hs) > 1 else hs[0]
        return self.output_convs(self.crp(h))


def _geometric_sigmas(sigma_begin: float, sigma_end: float, num_classes: int) -> torch.Tensor:
    # numpy in float64 then float32, exactly as the official get_sigmas builds the ladder.
    ladder = np.exp(np.linspace(np.log(sigma_begin), np.log(sigma_end), num_classes))
    return torch.tensor(ladder).float()


class NCSNv2(nn.Module):
    """The official NCSNv2 score network (CIFAR-10 / CelebA variant, InstanceNorm++, ELU).

    Input x in [0, 1] of shape (M, channels, H, W); internally h = 2x - 1. The CIFAR-10
    model is `NCSNv2(32, 3, 128, 232, 50.0, 0.01)` (29,694,083 parameters).

    Args:
        image_size: image side. 28 selects the official `adjust_padding` branch for res4
            (which, that block being dilated, changes no layer: the layout is the same).
        channels: image channels.
        ngf: base width (>= 2: InstanceNorm++ takes an unbiased variance across channels).
        num_classes: number of noise levels in the `sigmas` ladder.
        sigma_begin: largest noise level, sigmas[0].
        sigma_end: smallest noise level, sigmas[-1].

    Raises:
        ValueError: an argument out of range (named in the message).
    """

    def __init__(self, image_size: int = 32, channels: int = 3, ngf: int = 128, num_classes: int = 232,
                 sigma_begin: float = 50.0, sigma_end: float = 0.01):
        super().__init__()
        checks.integer("image_size", image_size, 2)
        if image_size % 2:
            raise ValueError(f"image_size must be even (one 2x downsampling), got {image_size}")
        checks.integer("channels", channels, 1)
        checks.integer("ngf", ngf, 2)
        checks.integer("num_classes", num_classes, 1)
        checks.real("sigma_begin", sigma_begin, positive=True)
        checks.real("sigma_end", sigma_end, positive=True)
        if num_classes > 1 and not sigma_begin > sigma_end:
            raise ValueError(f"sigma_begin must be > sigma_end, got sigma_begin={sigma_begin}, sigma_end={sigma_end}")
        self.image_size = image_size
        self.channels = channels
        self.ngf = ngf
        self.num_classes = num_classes
        self.sigma_begin = float(sigma_begin)
        self.sigma_end = float(sigma_end)

        self.register_buffer("sigmas", _geometric_sigmas(sigma_begin, sigma_end, num_classes))
        self.begin_conv = nn.Conv2d(channels, ngf, 3, padding=1)
        self.normalizer = InstanceNorm2dPlus(ngf)
        self.end_conv = nn.Conv2d(ngf, channels, 3, padding=1)
        w = 2 * ngf
        self.res1 = nn.ModuleList([ResidualBlock(ngf, ngf), ResidualBlock(ngf, ngf)])
        self.res2 = nn.ModuleList([ResidualBlock(ngf, w, resample="down"), ResidualBlock(w, w)])
        self.res3 = nn.ModuleList([ResidualBlock(w, w, resample="down", dilation=2),
                                   ResidualBlock(w, w, dilation=2)])
        self.res4 = nn.ModuleList([ResidualBlock(w, w, resample="down", dilation=4,
                                                 adjust_padding=image_size == 28),
                                   ResidualBlock(w, w, dilation=4)])
        self.refine1 = RefineBlock([w], w, start=True)
        self.refine2 = RefineBlock([w, w], w)
        self.refine3 = RefineBlock([w, w], ngf)
        self.refine4 = RefineBlock([ngf, ngf], ngf, end=True)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The noise-unconditional network output, before the division by sigma.

        Args:
            x: images in [0, 1], shape (M, channels, H, W).

        Returns:
            Tensor of x's shape.

        Raises:
            ValueError: x is not 4-D with `channels` channels.
        """
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (M, {self.channels}, H, W), got {tuple(x.shape)}")
        h = self.begin_conv(2 * x - 1.0)
        layer1 = self.res1[1](self.res1[0](h))
        layer2 = self.res2[1](self.res2[0](layer1))
        layer3 = self.res3[1](self.res3[0](layer2))
        layer4 = self.res4[1](self.res4[0](layer3))
        ref1 = self.refine1([layer4], layer4.shape[2:])
        ref2 = self.refine2([layer3, ref1], layer3.shape[2:])
        ref3 = self.refine3([layer2, ref2], layer2.shape[2:])
        out = self.refine4([layer1, ref3], layer1.shape[2:])
        return self.end_conv(F.elu(self.normalizer(out)))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The official forward: body(x) / sigmas[labels].

        Args:
            x: images in [0, 1], shape (M, channels, H, W).
            labels: int64 indices into `sigmas`, shape (M,). Not range-checked here (that
                would sync the device); an index out of range fails in the indexing.

        Returns:
            The score at sigmas[labels], shape of x.

        Raises:
            ValueError: wrong shapes.
        """
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        return self.body(x) / self.sigmas[labels].view(-1, 1, 1, 1)

    def score(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous-sigma score s(y, sigma) = body(y) / sigma.

        Equal to `forward(y, labels)` when sigma == sigmas[labels].

        Args:
            y: images (noisy, not necessarily in [0, 1]), shape (M, channels, H, W).
            sigma: noise levels, float tensor of shape (M,).

        Returns:
            Tensor of y's shape.

        Raises:
            ValueError: wrong shapes.
        """
        if sigma.shape != (y.shape[0],):
            raise ValueError(f"sigma must have shape ({y.shape[0]},), got {tuple(sigma.shape)}")
        return self.body(y) / sigma.view(-1, 1, 1, 1)


class NCSNv2Score(nn.Module):
    """`score(y, sigma)` adapter for an `NCSNv2`: forward(y, sigma) = model.score(y, sigma).

    Args:
        model: an `NCSNv2` (for example from `load_ncsnv2`).

    Raises:
        ValueError: model is not an `NCSNv2`.
    """

    def __init__(self, model: NCSNv2):
        super().__init__()
        if not isinstance(model, NCSNv2):
            raise ValueError(f"model must be an NCSNv2, got {type(model).__name__}")
        self.model = model

    def forward(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.model.score(y, sigma)


def _describe_keys(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_ncsnv2(path: str | os.PathLike, *, image_size: int = 32, channels: int = 3, ngf: int = 128,
                num_classes: int = 232, sigma_begin: float = 50.0, sigma_end: float = 0.01,
                use_ema: bool = True) -> NCSNv2:
    """Build an `NCSNv2` and load an official checkpoint into it (CPU, eval mode).

    The file is the official runner's `torch.save([model_state, optim_state, epoch, step,
    ema_shadow])`, read with `torch.load(weights_only=True)`: a file that needs arbitrary
    unpickling is refused. model_state keys lose their `module.` (DataParallel) prefix and
    must match the architecture exactly (strict). With `use_ema`, the EMA shadow (parameters
    only, no prefix; the weights the paper samples with) replaces the parameters.

    Args:
        path: the checkpoint file.
        image_size, channels, ngf, num_classes, sigma_begin, sigma_end: the architecture
            (defaults: the CIFAR-10 model).
        use_ema: load the EMA weights (True) or the raw training weights.

    Returns:
        The `NCSNv2`, on the CPU, in eval mode.

    Raises:
        FileNotFoundError: no file at path.
        ValueError: the file is not a weights-only checkpoint of the official layout, or its
            keys, shapes or sigma ladder do not match the given architecture (the message
            names the path and the keys).
    """
    model = NCSNv2(image_size, channels, ngf, num_classes, sigma_begin, sigma_end)
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"cannot load checkpoint {os.fspath(path)!r} with torch.load(weights_only=True): "
                         f"{err}") from err
    where = f"checkpoint {os.fspath(path)!r}"
    if (not isinstance(states, (list, tuple)) or len(states) < 1 or not isinstance(states[0], Mapping)
            or not all(isinstance(k, str) for k in states[0])):
        raise ValueError(f"{where} is not the official NCSNv2 layout [model_state, optim_state, epoch, step, "
                         f"ema_shadow]; got {type(states).__name__}")
    model_state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in states[0].items()}
    _check_state(model, model_state, model.state_dict(), f"{where} (model_state)")
    expected_sigmas = model.sigmas
    if not torch.allclose(model_state["sigmas"].float(), expected_sigmas, rtol=1e-5, atol=0.0):
        raise ValueError(f"{where}: its sigmas ({model_state['sigmas'][0].item():g} -> "
                         f"{model_state['sigmas'][-1].item():g}) differ from sigma_begin={sigma_begin}, "
                         f"sigma_end={sigma_end}")
    model.load_state_dict(model_state, strict=True)
    if use_ema:
        if len(states) < 5 or not isinstance(states[4], Mapping):
            raise ValueError(f"{where} holds no EMA shadow (5th element); pass use_ema=False for the raw weights")
        params = dict(model.named_parameters())
        _check_state(model, states[4], params, f"{where} (ema_shadow)")
        with torch.no_grad():
            for name, value in states[4].items():
                params[name].copy_(value)
    return model.eval()


def _ncsnv2_arch(path: str | os.PathLike) -> dict:
    """NCSNv2's constructor arguments read from an official checkpoint's model_state, or {}
    when the file does not have that layout (`load_ncsnv2` then says what is wrong)."""
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError):
        return {}
    if not isinstance(states, (list, tuple)) or not states or not isinstance(states[0], Mapping):
        return {}
    state = {k.removeprefix("module."): v for k, v in states[0].items() if isinstance(k, str)}
    conv, sigmas = state.get("begin_conv.weight"), state.get("sigmas")
    if not (isinstance(conv, torch.Tensor) and conv.dim() == 4 and isinstance(sigmas, torch.Tensor)
            and sigmas.dim() == 1 and len(sigmas)):
        return {}
    return {"ngf": conv.shape[0], "channels": conv.shape[1], "num_classes": len(sigmas),
            "sigma_begin": float(sigmas[0]), "sigma_end": float(sigmas[-1])}


def ncsnv2_score(path: str | os.PathLike, *, image_size: int = 32, use_ema: bool = True) -> NCSNv2Score:
    """An official NCSNv2 checkpoint as a `score(y, sigma)` module, its architecture read from
    the file: the width and channels from `begin_conv.weight`, the sigma ladder from the
    `sigmas` buffer (so the real ngf-128 CIFAR-10 model and the ngf-16 test fixture load alike).

    Args:
        path: the official runner's checkpoint (`load_ncsnv2` reads it, weights only).
        image_size: the images' side (32 for CIFAR-10; the file does not say it).
        use_ema: the EMA weights (the paper's) or the raw ones.

    Returns:
        `NCSNv2Score` on the CPU, in eval mode.

    Raises:
        FileNotFoundError: no file at path.
        ValueError: the file is not an official NCSNv2 checkpoint (`load_ncsnv2`'s message).
    """
    # The file is read twice: here for two shapes, then by load_ncsnv2, which checks all of it.
    return NCSNv2Score(load_ncsnv2(path, image_size=image_size, use_ema=use_ema, **_ncsnv2_arch(path))).eval()


def _check_state(model: nn.Module, state: Mapping, reference: Mapping[str, torch.Tensor], where: str) -> None:
    missing = set(reference) - set(state)
    unexpected = set(state) - set(reference)
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe_keys(unexpected)}")
    not_tensors = [k for k in set(state) & set(reference) if not isinstance(state[k], torch.Tensor)]
    if not_tensors:
        problems.append(f"non-tensor values: {_describe_keys(not_tensors)}")
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(reference[k].shape)}"
              for k in sorted(set(state) & set(reference) - set(not_tensors))
              if state[k].shape != reference[k].shape]
    if shapes:
        problems.append(f"shape mismatches (checkpoint vs model): {', '.join(shapes[:8])}"
                        + (f", ... ({len(shapes) - 8} more)" if len(shapes) > 8 else ""))
    if problems:
        raise ValueError(f"{where} does not match NCSNv2(image_size={model.image_size}, channels={model.channels}, "
                         f"ngf={model.ngf}, num_classes={model.num_classes}): " + "; ".join(problems))
