"""Small networks: a conv score model and a conv classifier (ReLU, softplus or GELU).

`ConvScoreNet` follows NCSNv2's design choice of a noise-unconditional body divided by
sigma, s(y, sigma) = body(y) / sigma, so one network serves every continuous sigma.
It is the score model of the tests, the benchmarks and the shipped Fashion-MNIST default.
`UNetScoreNet` (a residual U-Net) and `NCSNv2ScoreNet` (NCSNv2 built from a config) are the
stronger score candidates of `train-score --arch` (issue 13), with the same s = body / sigma.
`WideResNet` is the CIFAR-10 protocol's classifier (WRN-28-10, RobustBench's module names).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from torch import nn

from . import checks
from .scores.ncsnv2 import NCSNv2, NCSNv2Score


class ConvScoreNet(nn.Module):
    """s(y, sigma) = body(2y - 1) / sigma with a plain conv body (ELU between layers).

    Args:
        channels: image channels.
        width: hidden channels.
        depth: number of conv layers (>= 2).
        dilations: optional dilation of each of the `depth` 3x3 convs (default all 1). The
            shipped Fashion-MNIST default uses (1, 2, 3, 4, 3, 2, 1), IRCNN's denoiser
            layout: a 33x33 receptive field, enough to see a whole 28x28 image and judge its
            noise level, at the cost of a plain 7-layer stack.
    """

    def __init__(self, channels: int = 1, width: int = 32, depth: int = 4,
                 dilations: Sequence[int] | None = None):
        super().__init__()
        checks.integer("channels", channels, 1)
        checks.integer("width", width, 1)
        checks.integer("depth", depth, 2)
        dilations = (1,) * depth if dilations is None else tuple(dilations)
        if len(dilations) != depth:
            raise ValueError(f"dilations must be {depth} integers >= 1 (one per layer), got {dilations}")
        dilations = tuple(checks.integer("dilations entries", d, 1) for d in dilations)
        self.dilations = dilations
        self.config = {"channels": channels, "width": width, "depth": depth, "dilations": list(dilations)}
        d = dilations
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=d[0], dilation=d[0])]
        for i in range(1, depth - 1):
            layers += [nn.ELU(), nn.Conv2d(width, width, 3, padding=d[i], dilation=d[i])]
        layers += [nn.ELU(), nn.Conv2d(width, channels, 3, padding=d[-1], dilation=d[-1])]
        self.body = nn.Sequential(*layers)

    def forward(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.body(2 * y - 1) / sigma.view(-1, 1, 1, 1)



class _ResBlock(nn.Module):
    """x + conv(ELU(conv(ELU(x)))): 3x3 convs, same channels and size, no normalization."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(self.act(x))))


class UNetScoreNet(nn.Module):
    """s(y, sigma) = body(2y - 1) / sigma with a small U-Net body (noise-unconditional, as
    ConvScoreNet and NCSNv2).

    The body: a 3x3 conv to `width` channels; per level, `blocks` residual blocks
    (`x + conv(ELU(conv(ELU(x))))`), then a stride-2 3x3 conv that halves the side and
    doubles the channels (28 -> 14 -> 7 at `levels` 2); at the bottom `blocks` residual
    blocks; back up, a 2x2 stride-2 transposed conv, the encoder's output of that level added
    (additive skip: a concatenation would double the decoder convs' input channels and cost),
    `blocks` residual blocks; ELU and a 3x3 conv to `channels`. Every conv at level l has
    width * 2**l channels, so each costs the same FLOPs while the parameters grow 4x per
    level: capacity is bought where it is cheap. No normalization layer, so an image's score
    does not depend on its batch.

    Cost against the shipped ConvScoreNet (32 wide, 7 layers, 46,849 parameters) on 28x28, one
    CPU thread, untrained weights (`pursamere-fast score-quality`, one score forward + input
    gradient at batch 64, and one purify call with the shipped config): width 24, levels 2,
    blocks 1 has 345,601 parameters (7.4x) for 1.37x the cost per score evaluation (1.38x per
    purification); width 32: 613,889 parameters, 1.98x (2.00x); width 24, blocks 2: 2.4x.

    Args:
        channels: image channels.
        width: channels at full resolution (>= 1).
        levels: 2x downsamplings (>= 1); H and W must be divisible by 2**levels.
        blocks: residual blocks per level and at the bottom (>= 1).

    Raises:
        ValueError: an argument out of range, naming it; in forward, an image side not
            divisible by 2**levels.
    """

    def __init__(self, channels: int = 1, width: int = 32, levels: int = 2, blocks: int = 1):
        super().__init__()
        checks.integer("channels", channels, 1)
        checks.integer("width", width, 1)
        checks.integer("levels", levels, 1)
        checks.integer("blocks", blocks, 1)
        self.levels = levels
        self.config = {"channels": channels, "width": width, "levels": levels, "blocks": blocks}
        w = [width * 2 ** i for i in range(levels + 1)]
        self.head = nn.Conv2d(channels, width, 3, padding=1)
        self.down_blocks = nn.ModuleList(nn.Sequential(*(_ResBlock(w[i]) for _ in range(blocks)))
                                         for i in range(levels))
        self.downs = nn.ModuleList(nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1) for i in range(levels))
        self.mid = nn.Sequential(*(_ResBlock(w[levels]) for _ in range(blocks)))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in range(levels))
        self.up_blocks = nn.ModuleList(nn.Sequential(*(_ResBlock(w[i]) for _ in range(blocks)))
                                       for i in range(levels))
        self.tail = nn.Sequential(nn.ELU(), nn.Conv2d(width, channels, 3, padding=1))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The noise-unconditional network output on h = 2y - 1 (before the division by sigma)."""
        factor = 2 ** self.levels
        if x.dim() != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"y must be (M, C, H, W) with H and W divisible by 2**levels = {factor}, "
                             f"got {tuple(x.shape)}")
        h = self.head(x)
        skips = []
        for block, down in zip(self.down_blocks, self.downs):
            h = block(h)
            skips.append(h)
            h = down(h)
        h = self.mid(h)
        for i in reversed(range(self.levels)):
            h = self.up_blocks[i](self.ups[i](h) + skips[i])
        return self.tail(h)

    def forward(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.body(2 * y - 1) / sigma.view(-1, 1, 1, 1)


class NCSNv2ScoreNet(NCSNv2Score):
    """`scores.ncsnv2.NCSNv2` as score(y, sigma) = body(y) / sigma, built from a config so that
    `save_net` / `load_net` handle it (official checkpoints are `scores.load_ncsnv2`'s). Its
    weights live under "model." (the wrapped NCSNv2), whose `sigmas` ladder buffer is one
    level of 1.0: the official `forward(x, labels)` is not what this net is for, and
    score(y, sigma) takes any sigma.

    Args:
        image_size: image side, even (28 takes NCSNv2's adjust_padding branch).
        channels: image channels.
        ngf: NCSNv2's base width (>= 2).

    Its CPU cost is set by its ~1,000 small kernels per forward + backward more than by its
    FLOPs: on 28x28, one thread, batch 64, one score evaluation with its input gradient costs
    1.46x the shipped ConvScoreNet's at ngf 4 (29,541 parameters, 30 MFLOP against the conv's
    146), 1.77x at ngf 5 and 2.02x at ngf 6 (`pursamere-fast score-quality`).

    Raises:
        ValueError: an argument out of range (NCSNv2's checks, naming it).
    """

    def __init__(self, image_size: int = 28, channels: int = 1, ngf: int = 4):
        super().__init__(NCSNv2(image_size, channels, ngf, num_classes=1, sigma_begin=1.0, sigma_end=1.0))
        self.config = {"image_size": image_size, "channels": channels, "ngf": ngf}

# SmallCNN's activations. A file saved before the option existed has no "activation" in its
# arch_config, and load_net then builds the constructor's default, ReLU, which it was.
ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "gelu": nn.GELU}


class SmallCNN(nn.Module):
    """A small conv classifier from [0, 1] images to logits.

    Args:
        channels, num_classes, width, image_size: the input, the output and the hidden size.
        activation: "relu" (the default and the shipped classifier's), "softplus" (beta 1) or
            "gelu". The choice changes no parameter name, so every variant loads the same way;
            a smooth one suits training through input gradients (local flatness, SPEC 10),
            since ReLU's second derivative is zero almost everywhere.

    Raises:
        ValueError: `activation` is not one of those.
    """

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32, image_size: int = 28,
                 activation: str = "relu"):
        super().__init__()
        act = ACTIVATIONS[checks.choice("activation", activation, tuple(ACTIVATIONS))]
        self.config = {"channels": channels, "num_classes": num_classes, "width": width,
                       "image_size": image_size, "activation": activation}
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), act(),
            nn.Conv2d(width, width, 3, padding=1), act(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), act(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), act(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * side * side, 128), act(),
                                  nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class WideBasicBlock(nn.Module):
    """WideResNet's pre-activation block, RobustBench's `BasicBlock` with its module names:
    BN-ReLU-conv3x3 twice, plus the input (through a 1x1 `convShortcut` when the block
    changes the width or the resolution, else as is)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        # None when the identity fits, as in RobustBench, so the state dicts have the same keys.
        self.convShortcut = (None if in_planes == out_planes and stride == 1
                             else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        # The projection shortcut takes the activated input, the identity the raw one (RobustBench).
        return (x if self.convShortcut is None else self.convShortcut(act)) + out


class WideNetworkBlock(nn.Module):
    """One stage of WideResNet: `layer`, a Sequential of blocks, the first one striding."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*(WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                    stride if i == 0 else 1) for i in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet-depth-k (Zagoruyko & Komodakis 2016) from [0, 1] images to logits, with
    RobustBench's module names (conv1; block1..block3, each a `layer` of `WideBasicBlock`s with
    bn1, relu1, conv1, bn2, relu2, conv2, convShortcut; bn1, relu, fc), so its state dict has
    RobustBench's keys and `purifiers.saliency.SALIENCY_STAGES["WideResNet"]` names its stages
    at depth 28. No input normalisation inside (RobustBench's "Standard" CIFAR-10 model has
    none either); the harness's `mean`/`std` options add one if wanted. Widths 16, 16k, 32k,
    64k; stages 2 and 3 halve the resolution; global average pooling before fc, so any input
    side divisible by 4 works (32 for CIFAR-10: 8x8 before the pool, as RobustBench's
    avg_pool2d(8)).

    BatchNorm normalises with batch statistics in training mode, which makes an image's
    logits depend on its batch: purify and attack with the network in eval mode only
    (`load_net` returns it so).

    Args:
        depth: 6n + 4 layers, n >= 1 blocks per stage (28: 4 blocks, the protocol's WRN-28-10).
        widen_factor: k, the width multiplier.
        num_classes: outputs.
        channels: input channels.

    Raises:
        ValueError: an argument out of range, naming it.
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, channels: int = 3):
        super().__init__()
        checks.integer("depth", depth, 10)
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        checks.integer("widen_factor", widen_factor, 1)
        checks.integer("num_classes", num_classes, 1)
        checks.integer("channels", channels, 1)
        self.config = {"depth": depth, "widen_factor": widen_factor, "num_classes": num_classes,
                       "channels": channels}
        n, k = (depth - 4) // 6, widen_factor
        self.conv1 = nn.Conv2d(channels, 16, 3, stride=1, padding=1, bias=False)
        self.block1 = WideNetworkBlock(n, 16, 16 * k, 1)
        self.block2 = WideNetworkBlock(n, 16 * k, 32 * k, 2)
        self.block3 = WideNetworkBlock(n, 32 * k, 64 * k, 2)
        self.bn1 = nn.BatchNorm2d(64 * k)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(64 * k, num_classes)
        # RobustBench's initialisation: He normal over fan-out, BN at identity, zero fc bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(out.mean((2, 3)))


_NETS = {
    "ConvScoreNet": ConvScoreNet,
    "UNetScoreNet": UNetScoreNet,
    "NCSNv2ScoreNet": NCSNv2ScoreNet,
    "SmallCNN": SmallCNN,
    "WideResNet": WideResNet,
}


def save_net(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Save a network of this module (a class of `_NETS`) as safetensors, with its class and constructor
    arguments in the header so that `load_net` can rebuild it.

    Args:
        model: the network (its weights are saved as float32 on the CPU).
        path: the file to write.
        metadata: extra string entries for the header (e.g. how it was trained).

    Raises:
        ValueError: `model` is not one of the classes of this module.
    """
    from safetensors.torch import save_file

    name = type(model).__name__
    if _NETS.get(name) is not type(model):
        raise ValueError(f"model must be one of {sorted(_NETS)}, got {name}")
    header = dict(metadata or {})
    header.update({"arch": name, "arch_config": json.dumps(model.config)})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata=header)


def load_net(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a network written by `save_net` (safetensors only, no pickle).

    Args:
        path: the file.
        device: where to put the network.

    Returns:
        The network in eval mode.

    Raises:
        ValueError: the file is not safetensors, lacks the header entries `save_net` writes,
            or its weights do not fit the declared architecture.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors file: {e}") from None
    if header.get("arch") not in _NETS or "arch_config" not in header:
        raise ValueError(f"{path} has no arch/arch_config header naming one of {sorted(_NETS)}")
    model = _NETS[header["arch"]](**json.loads(header["arch_config"]))
    try:
        model.load_state_dict(load_file(os.fspath(path)))
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit {header['arch']}({header['arch_config']}): {e}") from e
    return model.to(device).eval()
