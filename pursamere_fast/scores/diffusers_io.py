"""diffusers models as this library's score, in two lines (SPEC 11).

    unet, scheduler = ...                       # e.g. a DDPMPipeline's .unet and .scheduler
    score = from_diffusers(unet, scheduler)     # or load_diffusers("path/to/saved/pipeline")

The scheduler says what the network is: a DDPM/DDIM-family scheduler carries `alphas_cumprod`
and `prediction_type` (a `VPScore`), a `ScoreSdeVeScheduler` marks diffusers' NCSN++ VE models,
which take sigma as their timestep and return the score (a `VEScore`). diffusers is an optional
extra (`pip install pursamere-fast[diffusers]`), imported only when these functions run; nothing
here reaches the network.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import checks
from .adapters import VP_PREDICTIONS, ScoreAdapter, VEScore, VPScore

__all__ = ["from_diffusers", "load_diffusers"]


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError("diffusers is not installed: pip install 'pursamere-fast[diffusers]'") from None
    return diffusers


def from_diffusers(unet, scheduler, *, data_range=None, timesteps: str = "continuous") -> ScoreAdapter:
    """The score of a diffusers network trained with `scheduler`.

    Args:
        unet: the network (a `UNet2DModel` or any callable `unet(sample, timestep)` returning a
            tensor or an object with `.sample`).
        scheduler: its scheduler: DDPM/DDIM-family (anything with `alphas_cumprod` and
            `config.prediction_type`) or `ScoreSdeVeScheduler`.
        data_range: the range of the training data; None: diffusers' conventions, (-1, 1) for
            the DDPM family, (0, 1) for ScoreSdeVe.
        timesteps: for VP models, "continuous" (real t, the default) or "nearest".

    Returns:
        A `VPScore` or `VEScore` with `unet` as its `.model`.

    Raises:
        ValueError: a scheduler this library cannot convert (named, with its prediction type).
    """
    checks.function("unet", unet)
    config = getattr(scheduler, "config", None)
    name = type(scheduler).__name__
    if name == "ScoreSdeVeScheduler":
        return VEScore(unet, prediction="score", data_range=(0.0, 1.0) if data_range is None else data_range)
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None or config is None:
        raise ValueError(f"scheduler must be a DDPM/DDIM-family scheduler (with alphas_cumprod and "
                         f"config.prediction_type) or a ScoreSdeVeScheduler, got {name}; for other models wrap the "
                         "network with VPScore, ContinuousVPScore or VEScore yourself (docs/scores.md)")
    prediction = getattr(config, "prediction_type", None) or config.get("prediction_type", "epsilon")
    if prediction not in VP_PREDICTIONS:
        raise ValueError(f"scheduler.config.prediction_type must be one of {VP_PREDICTIONS}, got {prediction!r} "
                         f"({name})")
    return VPScore(unet, alphas_cumprod, prediction=prediction,
                   data_range=(-1.0, 1.0) if data_range is None else data_range, timesteps=timesteps)


def _class_of(diffusers, folder: Path, filename: str, what: str):
    config = folder / filename
    if not config.is_file():
        raise ValueError(f"path: no {what} config at {config}")
    class_name = json.loads(config.read_text()).get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None:
        raise ValueError(f"path: {config} names class {class_name!r}, which diffusers does not have")
    return cls


def _scheduler_folder(path: Path, model_folder: Path) -> Path:
    for folder in (model_folder, path / "scheduler", model_folder.parent / "scheduler"):
        if (folder / "scheduler_config.json").is_file():
            return folder
    raise ValueError(f"path: no scheduler_config.json next to the model at {model_folder} nor in a 'scheduler' "
                     "folder: save the scheduler with it (scheduler.save_pretrained)")


def load_diffusers(path, *, subfolder: str | None = None, data_range=None,
                   timesteps: str = "continuous") -> ScoreAdapter:
    """The score of a diffusers model saved in a local folder (never the network).

    Args:
        path: a folder written by `save_pretrained`: a pipeline (with `model_index.json`,
            `unet/` and `scheduler/`, e.g. google/ddpm-cifar10-32 or google/ncsnpp-* downloaded
            by you), or a model folder with the scheduler's `scheduler_config.json` beside it
            or in a sibling `scheduler/` folder.
        subfolder: the model's folder inside `path` (default: `unet` for a pipeline).
        data_range, timesteps: as `from_diffusers`.

    Returns:
        The adapter of `from_diffusers`, its network in eval mode.

    Raises:
        ValueError: path is not a local folder, or holds no model or scheduler config.
        ImportError: diffusers is not installed.
    """
    if not isinstance(path, (str, Path)) or not Path(path).is_dir():
        raise ValueError(f"path must be a local folder written by save_pretrained (nothing is downloaded), got "
                         f"{path!r}")
    diffusers = _diffusers()
    path = Path(path)
    if subfolder is None and (path / "model_index.json").is_file():
        subfolder = "unet"
    model_folder = path / subfolder if subfolder else path
    model_cls = _class_of(diffusers, model_folder, "config.json", "model")
    unet = model_cls.from_pretrained(model_folder, local_files_only=True).eval()
    scheduler_folder = _scheduler_folder(path, model_folder)
    scheduler_cls = _class_of(diffusers, scheduler_folder, "scheduler_config.json", "scheduler")
    scheduler = scheduler_cls.from_pretrained(scheduler_folder, local_files_only=True)
    return from_diffusers(unet, scheduler, data_range=data_range, timesteps=timesteps)
