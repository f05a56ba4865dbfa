"""score_sde configurations: parsing the official config dict, and the CIFAR-10 presets.

The official code describes a model by an ml_collections `ConfigDict`; `config.to_dict()` has
the sections `model`, `data` and `training` (and others that do not affect the network).
`parse_config` reads the fields that matter into a frozen `ScoreSdeConfig`, checking each
and naming it (`model.nf`, `training.sde`, ...) when it is missing or wrong.

The presets are the official CIFAR-10 configs' values written out here (same numbers as
`configs/vp/cifar10_ddpmpp_continuous.py` etc. of yang-song/score_sde_pytorch).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["ScoreSdeConfig", "parse_config", "PRESETS", "preset", "sigma_table"]

_SDES = ("vpsde", "vesde")
_RESBLOCKS = ("ddpm", "biggan")
_PROGRESSIVE = ("none", "output_skip", "residual")
_PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
_EMBEDDINGS = ("fourier", "positional")
_COMBINE = ("sum", "cat")
_ACTS = ("elu", "relu", "lrelu", "swish")


@dataclass(frozen=True)
class ScoreSdeConfig:
    """The fields of an official score_sde config that define the network and its SDE.

    Field names are the official ones (`model.*`, `data.*`, `training.*` flattened). Fields
    that only the `ncsnpp` architecture reads keep their defaults for `ddpm`.
    """

    name: str
    sde: str
    continuous: bool
    image_size: int
    num_channels: int
    centered: bool
    nf: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    resamp_with_conv: bool
    conditional: bool
    nonlinearity: str
    scale_by_sigma: bool
    sigma_min: float
    sigma_max: float
    num_scales: int
    beta_min: float = 0.1
    beta_max: float = 20.0
    fir: bool = False
    fir_kernel: tuple[float, ...] = (1, 3, 3, 1)
    skip_rescale: bool = False
    resblock_type: str = "ddpm"
    progressive: str = "none"
    progressive_input: str = "none"
    progressive_combine: str = "sum"
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    init_scale: float = 0.0


def sigma_table(cfg: ScoreSdeConfig) -> torch.Tensor:
    """The official `sigmas` buffer: num_scales levels geometric from sigma_max down to sigma_min (float64)."""
    return torch.exp(torch.linspace(math.log(cfg.sigma_max), math.log(cfg.sigma_min), cfg.num_scales,
                                    dtype=torch.float64))


def _preset(*, sde: str, name: str = "ncsnpp", num_res_blocks: int = 4, **model) -> dict:
    """One official CIFAR-10 config as a to_dict()-style dict (the values that matter)."""
    vp = sde == "vpsde"
    base = {"name": name, "nf": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": num_res_blocks,
            "attn_resolutions": [16], "dropout": 0.1, "resamp_with_conv": True, "conditional": True,
            "nonlinearity": "swish", "normalization": "GroupNorm", "sigma_min": 0.01, "sigma_max": 50,
            "num_scales": 1000, "beta_min": 0.1, "beta_max": 20.0, "scale_by_sigma": not vp,
            "ema_rate": 0.9999 if vp else 0.999}
    if name == "ncsnpp":
        base.update({"fir": True, "fir_kernel": [1, 3, 3, 1], "skip_rescale": True, "resblock_type": "biggan",
                     "progressive": "none", "progressive_input": "residual", "progressive_combine": "sum",
                     "attention_type": "ddpm", "embedding_type": "fourier", "fourier_scale": 16,
                     "init_scale": 0.0, "conv_size": 3})
    base.update(model)
    return {"model": base,
            "data": {"dataset": "CIFAR10", "image_size": 32, "num_channels": 3, "centered": vp},
            "training": {"sde": sde, "continuous": True}}


_DDPMPP = {"fir": False, "progressive_input": "none", "embedding_type": "positional"}
_NCSNPP_VP = {"embedding_type": "positional"}

#: Official CIFAR-10 configs by name. Bare names are the ones the papers use (DDPM++ is the VP
#: model, DiffPure's is the deep one; NCSN++ is the VE model); the "vp/", "ve/" spellings are
#: the official file paths under configs/.
PRESETS: dict[str, dict] = {
    "vp/cifar10_ddpmpp_continuous": _preset(sde="vpsde", **_DDPMPP),
    "vp/cifar10_ddpmpp_deep_continuous": _preset(sde="vpsde", num_res_blocks=8, **_DDPMPP),
    "vp/cifar10_ncsnpp_continuous": _preset(sde="vpsde", **_NCSNPP_VP),
    "vp/cifar10_ncsnpp_deep_continuous": _preset(sde="vpsde", num_res_blocks=8, **_NCSNPP_VP),
    "vp/ddpm/cifar10_continuous": _preset(sde="vpsde", name="ddpm", num_res_blocks=2, scale_by_sigma=False),
    "ve/cifar10_ncsnpp_continuous": _preset(sde="vesde"),
    "ve/cifar10_ncsnpp_deep_continuous": _preset(sde="vesde", num_res_blocks=8),
}
_ALIASES = {
    "cifar10_ddpmpp_continuous": "vp/cifar10_ddpmpp_continuous",
    "cifar10_ddpmpp_deep_continuous": "vp/cifar10_ddpmpp_deep_continuous",
    "cifar10_ncsnpp_continuous": "ve/cifar10_ncsnpp_continuous",
    "cifar10_ncsnpp_deep_continuous": "ve/cifar10_ncsnpp_deep_continuous",
    "cifar10_ddpm_continuous": "vp/ddpm/cifar10_continuous",
}


def preset(name: str) -> dict:
    """The config dict of an official CIFAR-10 config by name (a fresh copy).

    Args:
        name: a key of `PRESETS` or a bare name such as "cifar10_ddpmpp_deep_continuous".

    Returns:
        A dict with `model`, `data`, `training`, as `config.to_dict()` gives.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    key = _ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(f"config: unknown preset {name!r}; known: {sorted(_ALIASES) + sorted(PRESETS)}")
    return json.loads(json.dumps(PRESETS[key]))


def _read_file(path: str) -> object:
    """A JSON file, or a YAML one (DiffPure's `configs/cifar10.yml` layout) when PyYAML is installed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yml", ".yaml")):
        try:
            import yaml
        except ImportError as err:
            raise ValueError(f"config: reading {path!r} needs PyYAML (pip install pyyaml)") from err
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"config: {path!r} is not valid YAML: {err}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"config: {path!r} is not valid JSON: {err}") from err


def _load_config(config) -> Mapping:
    """A config dict from a dict, an ml_collections ConfigDict, a JSON/YAML file, or a preset name."""
    if isinstance(config, Mapping):
        return config
    if callable(getattr(config, "to_dict", None)):  # ml_collections.ConfigDict
        return config.to_dict()
    if isinstance(config, (str, os.PathLike)):
        text = os.fspath(config)
        if isinstance(config, str) and (config in _ALIASES or config in PRESETS):
            return preset(config)
        if os.path.isfile(text):
            loaded = _read_file(text)
            if not isinstance(loaded, Mapping):
                raise ValueError(f"config: {text!r} holds {type(loaded).__name__}, not a config dict")
            return loaded
        raise ValueError(f"config: {text!r} is neither a preset name nor a file; presets: "
                         f"{sorted(_ALIASES) + sorted(PRESETS)}")
    raise ValueError(f"config must be a dict, a JSON path or a preset name, got {type(config).__name__}")


class _Section:
    """Typed, named reads from one config section (`model`, `data`, `training`)."""

    def __init__(self, root: Mapping, section: str):
        value = root.get(section)
        if not isinstance(value, Mapping):
            raise ValueError(f"config.{section} is missing or not a dict (got {type(value).__name__})")
        self.values, self.section = value, section

    def _get(self, key: str, default):
        if key in self.values:
            return self.values[key]
        if default is _REQUIRED:
            raise ValueError(f"config.{self.section}.{key} is missing")
        return default

    def _bad(self, key: str, value, what: str) -> ValueError:
        return ValueError(f"config.{self.section}.{key} must be {what}, got {value!r}")

    def int(self, key: str, default=None, *, minimum: int = 1) -> int:
        value = self._get(key, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(key, value, f"an int >= {minimum}")
        return value

    def float(self, key: str, default=None, *, positive: bool = False) -> float:
        value = self._get(key, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0) or value < 0:
            raise self._bad(key, value, "a positive number" if positive else "a number >= 0")
        return float(value)

    def bool(self, key: str, default=None) -> bool:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default=None) -> str:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, str) or value.lower() not in choices:
            raise self._bad(key, value, f"one of {', '.join(choices)}")
        return value.lower()

    def ints(self, key: str, *, allow_empty: bool = False) -> tuple[int, ...]:
        value = self._get(key, _REQUIRED)
        ok = isinstance(value, (list, tuple)) and (allow_empty or len(value) > 0) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
        if not ok:
            raise self._bad(key, value, "a list of positive ints")
        return tuple(value)


    def taps(self, key: str) -> tuple[float, ...]:
        value = self._get(key, _REQUIRED)
        ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value) \
            and sum(value) != 0
        if not ok:
            raise self._bad(key, value, "a non-empty list of filter taps with a non-zero sum")
        return tuple(float(v) for v in value)


_REQUIRED = object()


def parse_config(config) -> ScoreSdeConfig:
    """Read and check an official score_sde config.

    Args:
        config: the official config as a dict (`config.to_dict()`: keys `model`, `data`,
            `training`) or the ConfigDict itself, a path to a JSON file of it (or of
            `{"config": {...}}`, the fixtures' layout) or to a YAML file of the same sections
            (DiffPure's `configs/cifar10.yml`), or a preset name (see `PRESETS`).

    Returns:
        The `ScoreSdeConfig`.

    Raises:
        ValueError: a missing or invalid field (the message names it, e.g. `config.model.nf`),
            an architecture other than ncsnpp / ddpm, an SDE other than vpsde / vesde, or a
            combination the official code cannot build.
    """
    root = _load_config(config)
    if "model" not in root and isinstance(root.get("config"), Mapping):
        root = root["config"]
    model, data, training = (_Section(root, s) for s in ("model", "data", "training"))
    name = model.choice("name", ("ncsnpp", "ddpm"))
    sde = training.values.get("sde")
    if isinstance(sde, str) and sde.lower() == "subvpsde":
        raise ValueError("config.training.sde = 'subvpsde' is not supported: its marginal std (1 - alpha_bar) "
                         "is not a VP level, so no VE sigma maps onto it; use a vpsde or vesde checkpoint")
    fields = dict(
        name=name, sde=training.choice("sde", _SDES), continuous=training.bool("continuous"),
        image_size=data.int("image_size"), num_channels=data.int("num_channels"), centered=data.bool("centered"),
        nf=model.int("nf"), ch_mult=model.ints("ch_mult"), num_res_blocks=model.int("num_res_blocks"),
        attn_resolutions=model.ints("attn_resolutions", allow_empty=True), dropout=model.float("dropout"),
        resamp_with_conv=model.bool("resamp_with_conv"), conditional=model.bool("conditional"),
        nonlinearity=model.choice("nonlinearity", _ACTS), scale_by_sigma=model.bool("scale_by_sigma"),
        sigma_min=model.float("sigma_min", positive=True), sigma_max=model.float("sigma_max", positive=True),
        num_scales=model.int("num_scales"),
    )
    if fields["sde"] == "vpsde":
        fields.update(beta_min=model.float("beta_min"), beta_max=model.float("beta_max", positive=True))
    if name == "ncsnpp":
        fields.update(
            fir=model.bool("fir"), fir_kernel=model.taps("fir_kernel"),
            skip_rescale=model.bool("skip_rescale"), resblock_type=model.choice("resblock_type", _RESBLOCKS),
            progressive=model.choice("progressive", _PROGRESSIVE),
            progressive_input=model.choice("progressive_input", _PROGRESSIVE_INPUT),
            progressive_combine=model.choice("progressive_combine", _COMBINE),
            embedding_type=model.choice("embedding_type", _EMBEDDINGS), init_scale=model.float("init_scale"),
        )
        if fields["embedding_type"] == "fourier":
            fields["fourier_scale"] = model.float("fourier_scale")
    cfg = ScoreSdeConfig(**fields)
    _check_consistency(cfg, model)
    return cfg


def _check_consistency(cfg: ScoreSdeConfig, model: _Section) -> None:
    """Refuse combinations the official networks cannot build or that this library does not load."""
    if model.values.get("normalization", "GroupNorm") != "GroupNorm":
        raise ValueError(f"config.model.normalization must be 'GroupNorm', got {model.values['normalization']!r}")
    if model.values.get("conv_size", 3) != 3:
        raise ValueError(f"config.model.conv_size must be 3, got {model.values['conv_size']!r}")
    if model.values.get("attention_type", "ddpm") != "ddpm":
        raise ValueError(f"config.model.attention_type must be 'ddpm', got {model.values['attention_type']!r}")
    if not cfg.continuous:
        raise ValueError("config.training.continuous must be true: only continuous-time checkpoints load here "
                         "(their labels are 999 t for VP and sigma for VE)")
    if cfg.image_size % 2 ** (len(cfg.ch_mult) - 1):
        raise ValueError(f"config.data.image_size ({cfg.image_size}) must be divisible by 2^(len(ch_mult) - 1)")
    if cfg.sigma_min >= cfg.sigma_max:
        raise ValueError(f"config.model.sigma_min ({cfg.sigma_min}) must be below sigma_max ({cfg.sigma_max})")
    if cfg.sde == "vpsde" and cfg.beta_min >= cfg.beta_max:
        raise ValueError(f"config.model.beta_min ({cfg.beta_min}) must be below beta_max ({cfg.beta_max})")
    if cfg.name == "ddpm" and not cfg.conditional:
        raise ValueError("config.model.conditional must be true for the ddpm architecture")
    if cfg.name == "ddpm" and cfg.scale_by_sigma:
        # The official DDPM indexes its sigma table by the (real-valued) label: it cannot run.
        raise ValueError("config.model.scale_by_sigma must be false for a continuous ddpm model")
