"""Small networks: a conv score model and a conv classifier (ReLU, softplus or GELU).

`ConvScoreNet` follows NCSNv2's design choice of a noise-unconditional body divided by
sigma, s(y, sigma) = body(y) / sigma, so one network serves every continuous sigma.
It is the score model of the tests, the benchmarks and the shipped Fashion-MNIST default.
"""

from __future__ import annotations

from collections.abc import Sequence

import json
import os

import torch
from torch import nn

from . import checks


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


_NETS = {"ConvScoreNet": ConvScoreNet, "SmallCNN": SmallCNN}


def save_net(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Save a ConvScoreNet or SmallCNN as safetensors, with its class and constructor
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
