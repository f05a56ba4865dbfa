"""Load official score_sde checkpoints (DiffPure's CIFAR-10 model among them) as scores.

`load_score_sde(path, config)` builds this library's NCSN++ / DDPM++ / DDPM network from the
official config, loads the checkpoint strictly, applies the EMA shadow, and wraps the network
in the SPEC section 11 adapter:

- VP (`training.sde = "vpsde"`): `ContinuousVPScore(net, beta_min, beta_max, label_scale=999)`:
  the official score is -net(x_t, 999 t) / sqrt(1 - ab(t)); the adapter finds t from sigma
  by ab(t) = 1 / (1 + (c sigma)^2).
- VE (`"vesde"`): `VEScore(net, prediction="score")`: the network takes sigma_m = c sigma as
  its label and returns the score itself (scale_by_sigma divides inside the network).

The data range is (-1, 1) for `data.centered` and (0, 1) otherwise: a non-centered network
maps [0, 1] to [-1, 1] itself, so the adapter hands it [0, 1] data.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch
from torch import nn

from ..adapters import ContinuousVPScore, VEScore
from .configs import ScoreSdeConfig, parse_config
from .ddpm import DDPM
from .ncsnpp import NCSNpp

__all__ = ["load_score_sde", "score_sde_network", "score_sde_adapter", "load_score_sde_state",
           "cifar10_ddpmpp_continuous", "cifar10_ddpmpp_deep_continuous", "cifar10_ncsnpp_continuous",
           "cifar10_ncsnpp_deep_continuous", "cifar10_ddpm_continuous"]

_PREFIX = "module."


def score_sde_network(config) -> nn.Module:
    """Build the network an official config describes (official init, random weights).

    Built on the current default device, so `with torch.device("meta"): score_sde_network(...)`
    counts parameters without allocating them.

    Args:
        config: a config dict, a JSON path or a preset name (see `configs.parse_config`), or a
            parsed `ScoreSdeConfig`.

    Returns:
        An `NCSNpp` or `DDPM` module in train mode (call `.eval()` before use: it has dropout).

    Raises:
        ValueError: the config is invalid (the message names the field).
    """
    cfg = config if isinstance(config, ScoreSdeConfig) else parse_config(config)
    try:
        return NCSNpp(cfg) if cfg.name == "ncsnpp" else DDPM(cfg)
    except ValueError as err:
        if "divisible by num_groups" not in str(err):
            raise
        # Concatenated skip widths are only known while building: report the fields behind them.
        raise ValueError(f"config.model.nf ({cfg.nf}) x ch_mult {list(cfg.ch_mult)} gives a width GroupNorm "
                         f"cannot split: {err}") from err


def score_sde_adapter(net: nn.Module, config) -> ContinuousVPScore | VEScore:
    """Wrap a score_sde network in this library's score adapter (SPEC section 11).

    Args:
        net: the network (`score_sde_network(config)`, loaded or not).
        config: its config (anything `parse_config` takes, or a `ScoreSdeConfig`).

    Returns:
        `ContinuousVPScore` for a VP config, `VEScore` for a VE one, with `net` as `.model`.

    Raises:
        ValueError: the config is invalid.
    """
    cfg = config if isinstance(config, ScoreSdeConfig) else parse_config(config)
    data_range = (-1.0, 1.0) if cfg.centered else (0.0, 1.0)
    if cfg.sde == "vpsde":
        return ContinuousVPScore(net, beta_min=cfg.beta_min, beta_max=cfg.beta_max, prediction="epsilon",
                                 data_range=data_range, label_scale=999.0)
    return VEScore(net, prediction="score", data_range=data_range)


def _read_checkpoint(path) -> Mapping:
    """The checkpoint dict, read with weights_only=True on the CPU."""
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise FileNotFoundError(f"no score_sde checkpoint at {where!r}")
    try:
        states = torch.load(where, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"cannot load checkpoint {where!r} with torch.load(weights_only=True): {err}") from err
    if not isinstance(states, Mapping):
        raise ValueError(f"checkpoint {where!r} holds {type(states).__name__}, not the official dict "
                         f"{{'model', 'ema', 'optimizer', 'step'}}")
    return states


def _model_state(states: Mapping, where: str) -> dict[str, torch.Tensor]:
    """The model state_dict without DataParallel's `module.` prefix."""
    state = states.get("model")
    if state is None and states and all(isinstance(v, torch.Tensor) for v in states.values()):
        state = states  # a bare state_dict
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"checkpoint {where!r} has no 'model' state_dict")
    return {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): v for k, v in state.items()}


def _check_keys(net: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Strict matching: same keys, same shapes; the messages name the keys."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise ValueError(f"checkpoint {where!r} does not match the config's network: {'; '.join(parts)}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"checkpoint {where!r}: key {key!r} has shape {got}, the config's network "
                             f"needs {tuple(expected[key].shape)}")


def _check_sigmas(net: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """The stored sigma table must be the config's (sigma_min, sigma_max, num_scales)."""
    ours, theirs = net.sigmas.double(), state["sigmas"].double()
    if not torch.allclose(theirs, ours, rtol=1e-6, atol=0.0):
        raise ValueError(f"checkpoint {where!r}: its sigmas ({theirs[0].item():g} -> {theirs[-1].item():g}) differ "
                         f"from config.model.sigma_max / sigma_min ({ours[0].item():g} -> {ours[-1].item():g})")


def _apply_ema(net: nn.Module, states: Mapping, where: str) -> None:
    """Copy the EMA shadow onto the trainable parameters, in `parameters()` order.

    The official `ExponentialMovingAverage` keeps only `requires_grad` parameters, so fixed
    ones (NCSN++'s Fourier projection `W`) keep their `model` value.
    """
    ema = states.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
    if not isinstance(shadow, (list, tuple)):
        raise ValueError(f"checkpoint {where!r} holds no EMA shadow ('ema' -> 'shadow_params'); "
                         f"pass use_ema=False for the raw weights")
    params = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    if len(shadow) != len(params):
        raise ValueError(f"checkpoint {where!r}: the EMA shadow has {len(shadow)} tensors, the config's network "
                         f"has {len(params)} trainable parameters")
    for (name, param), value in zip(params, shadow, strict=True):
        if not isinstance(value, torch.Tensor) or value.shape != param.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"checkpoint {where!r}: EMA shadow entry for {name!r} has shape {got}, "
                             f"expected {tuple(param.shape)}")
    with torch.no_grad():
        for (_, param), value in zip(params, shadow, strict=True):
            param.copy_(value)


def load_score_sde_state(net: nn.Module, path, *, use_ema: bool = True) -> nn.Module:
    """Load an official checkpoint into a network built by `score_sde_network` (in place).

    Args:
        net: the network.
        path: the checkpoint file (`utils.save_checkpoint`'s dict).
        use_ema: apply the EMA shadow (the weights the papers sample with) after the raw weights.

    Returns:
        net, in eval mode.

    Raises:
        FileNotFoundError: no file at path.
        ValueError: not a weights-only checkpoint of the official layout, a missing or
            unexpected key (named), a shape or sigma-table mismatch, or no EMA when use_ema.
    """
    where = os.fspath(path)
    states = _read_checkpoint(path)
    state = _model_state(states, where)
    _check_keys(net, state, where)
    _check_sigmas(net, state, where)
    net.load_state_dict(state, strict=True)
    if use_ema:
        _apply_ema(net, states, where)
    return net.eval()


def load_score_sde(path, config, *, use_ema: bool = True) -> ContinuousVPScore | VEScore:
    """An official score_sde checkpoint as this library's score `s(y, sigma)` (SPEC section 11).

    Args:
        path: the checkpoint (`{'model', 'ema', 'optimizer', 'step'}` as the official
            `utils.save_checkpoint` writes it; DiffPure's `checkpoint_8.pth` is one), read with
            `torch.load(weights_only=True)`. Keys may carry DataParallel's `module.` prefix.
        config: the official config as a dict (`config.to_dict()`), a JSON file of it, or a
            preset name such as "cifar10_ddpmpp_deep_continuous" (see `configs.PRESETS`).
        use_ema: use the EMA weights (default, as the papers do) or the raw training weights.

    Returns:
        `ContinuousVPScore` (VP) or `VEScore` (VE) on the CPU, in eval mode, with the network
        as `.model`; move it with `.to(device)`.

    Raises:
        FileNotFoundError: no file at path.
        ValueError: a bad config (the message names the field), or a checkpoint that does not
            match it (the message names the key).
    """
    cfg = config if isinstance(config, ScoreSdeConfig) else parse_config(config)
    net = load_score_sde_state(score_sde_network(cfg), path, use_ema=use_ema)
    return score_sde_adapter(net, cfg).eval()


def _preset_loader(preset_name: str, what: str):
    """A `loader(path, *, use_ema=True)` bound to one preset: the path-only factory that
    harness configs name as their score (`score = "pursamere_fast.scores.score_sde:<preset>"`)."""

    def loader(path, *, use_ema: bool = True) -> ContinuousVPScore | VEScore:
        return load_score_sde(path, preset_name, use_ema=use_ema)

    loader.__name__ = loader.__qualname__ = preset_name
    loader.__doc__ = (f"{what} (official config `{preset_name}`) from its checkpoint: "
                      f"`load_score_sde(path, {preset_name!r}, use_ema=use_ema)`.")
    return loader


cifar10_ddpmpp_continuous = _preset_loader("cifar10_ddpmpp_continuous", "score_sde's CIFAR-10 DDPM++ continuous VP")
cifar10_ddpmpp_deep_continuous = _preset_loader(
    "cifar10_ddpmpp_deep_continuous", "DiffPure's CIFAR-10 model, DDPM++ deep continuous VP (`checkpoint_8.pth`)")
cifar10_ncsnpp_continuous = _preset_loader("cifar10_ncsnpp_continuous", "score_sde's CIFAR-10 NCSN++ continuous VE")
cifar10_ncsnpp_deep_continuous = _preset_loader("cifar10_ncsnpp_deep_continuous",
                                                "score_sde's CIFAR-10 NCSN++ deep continuous VE")
cifar10_ddpm_continuous = _preset_loader("cifar10_ddpm_continuous", "score_sde's CIFAR-10 DDPM continuous VP")
