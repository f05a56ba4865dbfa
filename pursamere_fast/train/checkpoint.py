"""One training run's directory: checkpoint, loss log and plot, shared by every trainer.

A run keeps one checkpoint, ``<out_dir>/checkpoint.safetensors``: tensors under prefixes the
trainer chooses ("model.", "ema.", "optim."), and in the safetensors header (JSON) the step
reached and the hyperparameters of the run. A resume with other hyperparameters is refused.

Each step's loss goes to ``<out_dir>/loss.csv`` (written with each checkpoint, so the log
and the checkpoint agree; on resume rows past the checkpoint are dropped and the curve
continues) and is plotted to ``<out_dir>/loss.png`` (at the end of a run, and at checkpoints
at most every 30 s).

A checkpoint that cannot be continued raises `ResumeError` (a ValueError), which the command
lines report as a one-line error naming --out.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pursamere_fast import checks

CHECKPOINT = "checkpoint.safetensors"
LOSS_LOG = "loss.csv"
LOSS_PNG = "loss.png"
_FORMAT = "pursamere_fast.train/1"
# A plot costs ~0.3 s, more than a tiny run's steps: checkpoints redraw it at most this often
# (the end of a run always does).
_PLOT_INTERVAL_S = 30.0


@dataclass
class TrainResult:
    """What a trainer returns.

    Attributes:
        model: the trained network in eval mode (for `train_score`, a copy holding the EMA
            weights; the model passed in holds the raw weights).
        step: optimizer steps done in total.
        losses: (step, loss) of every step of the run, resumed parts included.
        out_dir: where the checkpoint, loss log and plot are.
    """

    model: nn.Module
    step: int
    losses: list[tuple[int, float]]
    out_dir: Path


class ResumeError(ValueError):
    """The checkpoint in a run directory cannot be continued with the arguments given: other
    hyperparameters, another model, a step past the end, or another trainer's checkpoint."""


def step_generator(seed: int, *stream: int) -> torch.Generator:
    # SeedSequence mixes (seed, stream...) into independent, collision-free seeds.
    state = np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state))


def as_image_tensor(images) -> torch.Tensor:
    # The loaders return numpy arrays: accept those too.
    return checks.images("images", torch.as_tensor(images)).float()


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("model has no parameters to train")
    return p.device


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, os.fspath(tmp), metadata)
    os.replace(tmp, path)


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"optim.{i}.{k}": v for i, st in opt.state_dict()["state"].items()
            for k, v in st.items() if torch.is_tensor(v)}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ResumeError(f"checkpoint {path} does not fit the model: {e}") from e


class RunDirectory:
    """Checkpoint, loss log and plot of one training run in `out_dir`."""

    def __init__(self, out_dir, kind: str, hparams: dict, resume: bool):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kind, self.hparams = kind, hparams
        self.ckpt, self.log, self.png = self.dir / CHECKPOINT, self.dir / LOSS_LOG, self.dir / LOSS_PNG
        self.losses: list[tuple[int, float]] = []
        self.pending: list[tuple[int, float]] = []
        self.last_plot = time.monotonic()
        if not resume:
            for p in (self.ckpt, self.log, self.png):
                p.unlink(missing_ok=True)

    def load(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The checkpoint's (step, tensors), or None; trims the loss log to the checkpoint.

        Raises:
            ResumeError: the checkpoint is another trainer's or has other hyperparameters.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not self.ckpt.is_file():
            self.log.unlink(missing_ok=True)
            return None
        with safe_open(os.fspath(self.ckpt), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _FORMAT or meta.get("kind") != self.kind:
            raise ResumeError(f"{self.ckpt} is not a {self.kind} checkpoint of this trainer "
                             f"(format={meta.get('format')!r}, kind={meta.get('kind')!r})")
        saved = json.loads(meta["hparams"])
        if saved != self.hparams:
            diff = {k: (saved.get(k), self.hparams.get(k)) for k in set(saved) | set(self.hparams)
                    if saved.get(k) != self.hparams.get(k)}
            raise ResumeError(f"cannot resume from {self.ckpt}: hyperparameters differ (checkpoint, now): "
                              f"{diff}; start over with resume=False (command line: --no-resume)")
        step = int(meta["step"])
        if self.log.is_file():
            with open(self.log, newline="") as f:
                rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
            self.losses = [r for r in rows if r[0] < step]
            self._write_log(self.losses, mode="w")
        return step, load_file(os.fspath(self.ckpt))

    def record(self, step: int, loss: float) -> None:
        self.pending.append((step, loss))

    def save(self, step: int, tensors: dict[str, torch.Tensor], final: bool) -> None:
        # Log first, checkpoint second: a kill in between leaves rows past the checkpoint,
        # which `load` drops.
        self._write_log(self.pending, mode="a")
        self.losses += self.pending
        self.pending = []
        _atomic_save(tensors, self.ckpt, {"format": _FORMAT, "kind": self.kind, "step": str(step),
                                          "hparams": json.dumps(self.hparams)})
        if final or time.monotonic() - self.last_plot > _PLOT_INTERVAL_S:
            plot_losses(self.losses, self.png, title=f"{self.kind} training loss")
            self.last_plot = time.monotonic()

    def _write_log(self, rows, mode: str) -> None:
        new = mode == "w" or not self.log.is_file()
        with open(self.log, mode, newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "loss"])
            w.writerows((s, repr(v)) for s, v in rows)


def plot_losses(losses: Sequence[tuple[int, float]], path: str | os.PathLike, title: str = "training loss") -> None:
    """Plot (step, loss) pairs and a moving average to a PNG (matplotlib, Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if losses:
        steps = np.array([s for s, _ in losses])
        vals = np.array([v for _, v in losses])
        ax.plot(steps, vals, lw=0.5, alpha=0.4, label="per step")
        w = max(1, min(100, len(vals) // 20))
        if w > 1:
            smooth = np.convolve(vals, np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1:], smooth, lw=1.5, label=f"mean of {w}")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
