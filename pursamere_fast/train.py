"""Training of score models and classifiers: resumable, deterministic, no pickle.

Both trainers keep one checkpoint, ``<out_dir>/checkpoint.safetensors``: model weights
("model.*"), the EMA shadow ("ema.*", score training), Adam's state tensors ("optim.*"), and
in the safetensors header (JSON) the step reached and the hyperparameters of the run. A run
started again with ``resume=True`` continues from it and ends with the same weights as a run
that was never interrupted: every step draws its batch and noise from a generator seeded by
(seed, step), and the learning rate is constant, so nothing else needs saving. A resume with
different hyperparameters is refused; `steps` / `epochs` may grow.

Each step's loss goes to ``<out_dir>/loss.csv`` (written with each checkpoint, so the log
and the checkpoint agree; on resume rows past the checkpoint are dropped and the curve
continues) and is plotted to ``<out_dir>/loss.png`` (at the end of a run, and at checkpoints
at most every 30 s).

Command lines (wired by the package CLI as ``pursamere-fast train-score`` and
``pursamere-fast train-classifier``): `main_train_score`, `main_train_classifier`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pursamere_fast import checks
from pursamere_fast.cli import ArgumentParser, existing_file, integer, listed, option_errors, random_seed, real
from pursamere_fast.config import geometric_sigmas

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


def _generator(seed: int, *stream: int) -> torch.Generator:
    # SeedSequence mixes (seed, stream...) into independent, collision-free seeds.
    state = np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state))


def _images(images) -> torch.Tensor:
    # The loaders return numpy arrays: accept those too.
    return checks.images("images", torch.as_tensor(images)).float()


def _sigmas(sigmas) -> tuple[float, ...]:
    sigmas = checks.reals("sigmas", sigmas)
    if min(sigmas) <= 0:
        raise ValueError(f"sigmas must be positive numbers, got {sigmas}")
    return sigmas


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("model has no parameters to train")
    return p.device


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, os.fspath(tmp), metadata)
    os.replace(tmp, path)


def _optim_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"optim.{i}.{k}": v for i, st in opt.state_dict()["state"].items()
            for k, v in st.items() if torch.is_tensor(v)}


def _load_optim(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


class _Run:
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
        """The checkpoint's (step, tensors), or None; trims the loss log to the checkpoint."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not self.ckpt.is_file():
            self.log.unlink(missing_ok=True)
            return None
        with safe_open(os.fspath(self.ckpt), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _FORMAT or meta.get("kind") != self.kind:
            raise ValueError(f"{self.ckpt} is not a {self.kind} checkpoint of this trainer "
                             f"(format={meta.get('format')!r}, kind={meta.get('kind')!r})")
        saved = json.loads(meta["hparams"])
        if saved != self.hparams:
            diff = {k: (saved.get(k), self.hparams.get(k)) for k in set(saved) | set(self.hparams)
                    if saved.get(k) != self.hparams.get(k)}
            raise ValueError(f"cannot resume from {self.ckpt}: hyperparameters differ "
                             f"(checkpoint, now): {diff}; pass resume=False to start over")
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


def score_matching_loss(model: Callable, x: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """NCSN's multi-sigma denoising score matching loss with lambda(sigma) = sigma^2.

    loss = mean_b 0.5 * || sigma_b * s(x_b + sigma_b z_b, sigma_b) + z_b ||^2 (sum over C,H,W).

    Args:
        model: score(y, sigma) with y (B, C, H, W), sigma (B,).
        x: clean images (B, C, H, W).
        sigma: per-image noise levels (B,).
        z: standard normal noise like x.
    """
    s4 = sigma.view(-1, 1, 1, 1)
    residual = s4 * model(x + s4 * z, sigma) + z
    return 0.5 * residual.pow(2).flatten(1).sum(1).mean()


def train_score(model: nn.Module, images, *, sigmas: Sequence[float], steps: int, batch_size: int,
                lr: float, ema: float = 0.999, out_dir: str | os.PathLike, seed: int, resume: bool = True,
                checkpoint_every: int = 500, progress: bool = True) -> TrainResult:
    """Train a score model by multi-sigma denoising score matching (NCSN), with an EMA.

    Each step draws `batch_size` images (with replacement), a sigma per image uniformly from
    the ladder `sigmas`, and z ~ N(0, I), all from a generator seeded by (seed, step); the loss
    is `score_matching_loss`; Adam at a constant `lr`; the EMA shadow follows every step.

    Args:
        model: score(y, sigma) network, trained in place (raw weights); on its device.
        images: float (N, C, H, W) in [0, 1] (tensor or numpy), kept on the CPU.
        sigmas: the noise ladder (positive).
        steps: total optimizer steps (a resumed run continues up to it).
        batch_size, lr: as usual.
        ema: EMA decay in [0, 1).
        out_dir: checkpoint, loss.csv and loss.png go here.
        seed: fixes every random draw of the run.
        resume: continue from `out_dir`'s checkpoint if there is one (False starts over).
        checkpoint_every: steps between checkpoints (also written at the end).
        progress: show a tqdm bar.

    Returns:
        TrainResult whose model is a copy holding the EMA weights.

    Raises:
        ValueError: bad arguments, or a checkpoint made with other hyperparameters or past `steps`.
    """
    images = _images(images)
    sig = torch.tensor(_sigmas(sigmas), dtype=torch.float32)
    steps = checks.integer("steps", steps, 1)
    batch_size = checks.integer("batch_size", batch_size, 1)
    lr = checks.real("lr", lr, positive=True)
    checkpoint_every = checks.integer("checkpoint_every", checkpoint_every, 1)
    seed = checks.seed("seed", seed)
    # ema = 1 would freeze the exported weights at their initialization.
    if checks.real("ema", ema, 0, 1) == 1:
        raise ValueError(f"ema must be a finite number >= 0 and < 1, got {ema!r}")
    device = _device_of(model)
    hparams = {"sigmas": [float(s) for s in sig], "batch_size": batch_size, "lr": lr, "ema": ema,
               "seed": seed, "images": list(images.shape), "images_sum": round(float(images.double().sum()), 3)}
    run = _Run(out_dir, "score", hparams, resume)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    params = dict(model.named_parameters())
    shadow = {k: p.detach().clone() for k, p in params.items()}
    start = 0
    loaded = run.load()
    if loaded is not None:
        start, tensors = loaded
        if start > steps:
            raise ValueError(f"checkpoint in {run.dir} is at step {start}, past steps={steps}")
        _load_model(model, tensors, "model.", run.ckpt)
        for k in shadow:
            shadow[k].copy_(tensors[f"ema.{k}"])
        _load_optim(opt, tensors)

    def state() -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in model.state_dict().items()}
        out.update({f"ema.{k}": v for k, v in shadow.items()})
        out.update(_optim_tensors(opt))
        return out

    model.train()
    names = list(params)
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="train-score", dynamic_ncols=True)
    for step in range(start, steps):
        g = _generator(seed, step)
        idx = torch.randint(images.shape[0], (batch_size,), generator=g)
        level = torch.randint(sig.numel(), (batch_size,), generator=g)
        z = torch.randn((batch_size, *images.shape[1:]), generator=g)
        loss = score_matching_loss(model, images[idx].to(device), sig[level].to(device), z.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_([shadow[k] for k in names], [params[k].detach() for k in names], 1.0 - ema)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"score loss is {value} at step {step}; lower lr")
        run.record(step, value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.2f}", refresh=False)
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            run.save(step + 1, state(), final=step + 1 == steps)
    bar.close()
    model.eval()
    ema_model = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in ema_model.named_parameters():
            p.copy_(shadow[k])
    return TrainResult(ema_model.eval(), steps, run.losses, run.dir)


def _load_model(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit the model: {e}") from e


def train_classifier(model: nn.Module, images, labels, *, epochs: int, batch_size: int, lr: float,
                     out_dir: str | os.PathLike, seed: int, purify_score: Callable | None = None,
                     purify_config=None, resume: bool = True, checkpoint_every: int = 200,
                     progress: bool = True) -> TrainResult:
    """Train a classifier with cross-entropy, optionally with purified augmentation.

    Every epoch visits the images in a permutation drawn from (seed, epoch); Adam at a
    constant `lr`. With `purify_score`, each batch's loss is the paper's
    CE(model(x), y) + CE(model(purify(x)), y), purify run with SAM off (sam_radius = 0) as
    the paper does for training data, its noise fixed by the config's seed.

    Args:
        model: classifier from [0, 1] images to logits, trained in place; on its device.
        images: float (N, C, H, W) in [0, 1]; labels: integer (N,).
        epochs, batch_size, lr: as usual (the last batch of an epoch may be smaller).
        out_dir: checkpoint, loss.csv and loss.png go here.
        seed: fixes the data order.
        purify_score: score(y, sigma) for purified augmentation, or None.
        purify_config: PurifyConfig for it (None: the default config).
        resume: continue from `out_dir`'s checkpoint if there is one.
        checkpoint_every: steps between checkpoints (also at each epoch's end).
        progress: show a tqdm bar.

    Returns:
        TrainResult with the trained model.

    Raises:
        ValueError: bad arguments, or a checkpoint made with other hyperparameters or past `epochs`.
    """
    images = _images(images)
    labels = checks.labels("labels", torch.as_tensor(labels), images.shape[0]).long()
    epochs = checks.integer("epochs", epochs, 1)
    batch_size = checks.integer("batch_size", batch_size, 1)
    lr = checks.real("lr", lr, positive=True)
    checkpoint_every = checks.integer("checkpoint_every", checkpoint_every, 1)
    seed = checks.seed("seed", seed)
    device = _device_of(model)
    config_desc = None
    if purify_score is not None:
        from pursamere_fast import PurifyConfig, purify

        purify_config = PurifyConfig() if purify_config is None else purify_config
        config_desc = repr(purify_config)
    hparams = {"batch_size": batch_size, "lr": lr, "seed": seed, "images": list(images.shape),
               "images_sum": round(float(images.double().sum()), 3), "labels_sum": int(labels.sum()),
               "purify_config": config_desc}
    run = _Run(out_dir, "classifier", hparams, resume)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = images.shape[0]
    per_epoch = math.ceil(n / batch_size)
    total = epochs * per_epoch
    start = 0
    loaded = run.load()
    if loaded is not None:
        start, tensors = loaded
        if start > total:
            raise ValueError(f"checkpoint in {run.dir} is at step {start}, past epochs={epochs} ({total} steps)")
        _load_model(model, tensors, "model.", run.ckpt)
        _load_optim(opt, tensors)

    def state() -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in model.state_dict().items()}
        out.update(_optim_tensors(opt))
        return out

    model.train()
    perm_epoch, perm = -1, None
    bar = tqdm(total=total, initial=start, disable=not progress, desc="train-classifier", dynamic_ncols=True)
    for step in range(start, total):
        epoch, b = divmod(step, per_epoch)
        if epoch != perm_epoch:
            perm_epoch, perm = epoch, torch.randperm(n, generator=_generator(seed, epoch))
        idx = perm[b * batch_size:(b + 1) * batch_size]
        x, y = images[idx].to(device), labels[idx].to(device)
        loss = F.cross_entropy(model(x), y)
        if purify_score is not None:
            with torch.no_grad():
                x_pur = purify(x, purify_score, purify_config, sam_radius=0.0)
            loss = loss + F.cross_entropy(model(x_pur), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"classifier loss is {value} at step {step}; lower lr")
        run.record(step, value)
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{value:.3f}", refresh=False)
        if (step + 1) % checkpoint_every == 0 or (step + 1) % per_epoch == 0:
            run.save(step + 1, state(), final=step + 1 == total)
    bar.close()
    return TrainResult(model.eval(), total, run.losses, run.dir)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, images, labels, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` on (images, labels).

    Raises:
        ValueError: images not float (N, C, H, W) in [0, 1], or labels not (N,).
    """
    images = _images(images)
    labels = checks.labels("labels", torch.as_tensor(labels), images.shape[0])
    batch_size = checks.integer("batch_size", batch_size, 1)
    device = _device_of(model)
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        pred = model(images[i:i + batch_size].to(device)).argmax(1).cpu()
        correct += int((pred == labels[i:i + batch_size]).sum())
    return correct / images.shape[0]


@torch.no_grad()
def evaluate_denoiser(score: Callable, images, sigmas: Sequence[float], *, seed: int = 0,
                      batch_size: int = 500) -> dict[float, dict[str, float]]:
    """Tweedie denoising error of a score model: x_hat = y + sigma^2 s(y, sigma), y = x + sigma z.

    Args:
        score: score(y, sigma).
        images: clean float (N, C, H, W) in [0, 1].
        sigmas: noise levels to test.
        seed: seed of z (the same z for every sigma).
        batch_size: images per forward.

    Returns:
        {sigma: {"tweedie_mse": ..., "noisy_mse": ..., "n": N}}, MSE per pixel averaged over
        the images (noisy_mse is the error of the noisy input y itself).
    """
    images = _images(images)
    sigmas = _sigmas(sigmas)
    batch_size = checks.integer("batch_size", batch_size, 1)
    z = torch.randn(images.shape, generator=_generator(checks.seed("seed", seed), 0))
    out: dict[float, dict[str, float]] = {}
    device = _device_of(score) if isinstance(score, nn.Module) else torch.device("cpu")
    for sigma in sigmas:
        se_tw = se_noisy = 0.0
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(device).double()
            y = (x + sigma * z[i:i + batch_size].to(device).double()).float()
            s = score(y, torch.full((y.shape[0],), float(sigma), device=device))
            x_hat = y.double() + sigma ** 2 * s.double()
            se_tw += float((x_hat - x).pow(2).sum())
            se_noisy += float((y.double() - x).pow(2).sum())
        count = images.numel()
        out[float(sigma)] = {"tweedie_mse": se_tw / count, "noisy_mse": se_noisy / count, "n": images.shape[0]}
    return out


def _load_dataset(name: str, root: str | None, split: str):
    from pursamere_fast.data import load_cifar10, load_fashion_mnist

    if name == "fashion-mnist":
        return load_fashion_mnist(split, root)
    if root is None:
        raise ValueError("required for --dataset cifar10")
    return load_cifar10(root, split)


def _load_datasets(p: argparse.ArgumentParser, args):
    with option_errors(p, "--data-root"):
        return (_load_dataset(args.dataset, args.data_root, "train"),
                _load_dataset(args.dataset, args.data_root, "test"))


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (checkpoint, loss.csv, loss.png, metrics.json)")
    p.add_argument("--dataset", choices=["fashion-mnist", "cifar10"], default="fashion-mnist", help="training data")
    p.add_argument("--data-root", default=None,
                   help="dataset directory (Fashion-MNIST default: $PURSAMERE_FASHION_MNIST, "
                        "then /usr/share/datasets/fashion-mnist)")
    p.add_argument("--width", type=integer(1), default=32, help="hidden channels of the network")
    p.add_argument("--batch-size", type=integer(1), default=64, help="images per step")
    p.add_argument("--lr", type=real(positive=True), default=1e-3, help="Adam learning rate (constant)")
    p.add_argument("--seed", type=random_seed, default=0, help="fixes initialization, data order and noise")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--export", default=None, help="also write the final weights (safetensors) here")
    p.add_argument("--threads", type=integer(1), default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def main_train_score(argv: Sequence[str] | None = None) -> int:
    """``pursamere-fast train-score``: train a ConvScoreNet, evaluate its denoising, export it."""
    from pursamere_fast.nets import ConvScoreNet, save_net

    p = ArgumentParser(prog="pursamere-fast train-score", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train a ConvScoreNet by multi-sigma denoising score matching, "
                                   "report its Tweedie denoising on test images, export it. "
                                   "The defaults reproduce the shipped Fashion-MNIST score model.")
    _common_args(p)
    p.add_argument("--depth", type=integer(2), default=7, help="conv layers")
    p.add_argument("--dilations", type=listed(integer(1)), default=[1, 2, 3, 4, 3, 2, 1],
                   help="comma-separated dilation per conv layer (length --depth)")
    p.add_argument("--sigma-max", type=real(positive=True), default=1.0, help="largest sigma of the geometric ladder")
    p.add_argument("--sigma-min", type=real(positive=True), default=0.01, help="smallest sigma of the ladder")
    p.add_argument("--num-sigmas", type=integer(1), default=20, help="levels of the ladder")
    p.add_argument("--steps", type=integer(1), default=6000,
                   help="total optimizer steps (a resumed run goes up to it)")
    p.add_argument("--ema", type=real(0, 1), default=0.999, help="EMA decay of the exported weights, < 1")
    p.add_argument("--checkpoint-every", type=integer(1), default=250, help="steps between checkpoints")
    p.add_argument("--eval-n", type=integer(1), default=1000, help="test images for the denoising figures")
    args = p.parse_args(argv)
    if len(args.dilations) != args.depth:
        p.error(f"argument --dilations: must be --depth ({args.depth}) integers, got {len(args.dilations)}")
    if args.ema == 1:
        p.error(f"argument --ema: value must be a finite number >= 0 and < 1, got {args.ema!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    (images, _), (test, _) = _load_datasets(p, args)
    torch.manual_seed(args.seed)
    model = ConvScoreNet(images.shape[1], args.width, args.depth, dilations=args.dilations)
    sigmas = geometric_sigmas(args.sigma_max, args.sigma_min, args.num_sigmas)
    t0 = time.time()
    result = train_score(model, images, sigmas=sigmas, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, ema=args.ema, out_dir=args.out, seed=args.seed,
                         resume=not args.no_resume, checkpoint_every=args.checkpoint_every,
                         progress=not args.no_progress)
    seconds = time.time() - t0
    denoise = evaluate_denoiser(result.model, test[:args.eval_n], (0.01, 0.05, 0.1, 0.25, 0.5), seed=args.seed)
    metrics = {"kind": "score", "args": vars(args),
               "sigmas": list(sigmas), "steps": result.step, "seconds_this_invocation": round(seconds, 1),
               "final_loss_mean_last_100": float(np.mean([v for _, v in result.losses[-100:]])),
               "denoising_test": {str(k): v for k, v in denoise.items()}}
    Path(args.out, "metrics.json").write_text(json.dumps(metrics, indent=2))
    save_net(result.model, Path(args.out) / "score_ema.safetensors", {"training": json.dumps(metrics)})
    if args.export:
        save_net(result.model, args.export, {"training": json.dumps(metrics)})
    for sigma, v in denoise.items():
        print(f"sigma={sigma:g}: tweedie mse {v['tweedie_mse']:.5f}  noisy mse {v['noisy_mse']:.5f}  (n={v['n']})")
    return 0


def main_train_classifier(argv: Sequence[str] | None = None) -> int:
    """``pursamere-fast train-classifier``: train a SmallCNN, measure test accuracy, export it."""
    from pursamere_fast.nets import SmallCNN, load_net, save_net

    p = ArgumentParser(prog="pursamere-fast train-classifier", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train a SmallCNN classifier (optionally with purified augmentation), "
                                   "measure its test accuracy, export it. The defaults reproduce the "
                                   "shipped Fashion-MNIST classifier.")
    _common_args(p)
    p.set_defaults(batch_size=128)
    p.add_argument("--epochs", type=integer(1), default=4,
                   help="passes over the training set (a resumed run goes up to it)")
    p.add_argument("--checkpoint-every", type=integer(1), default=200, help="steps between checkpoints")
    p.add_argument("--purify-score", type=existing_file, default=None,
                   help="score model file (safetensors from train-score) for purified augmentation")
    p.add_argument("--purify-config", default=None,
                   help="JSON object of PurifyConfig fields for the augmentation (sam_radius is forced to 0; "
                        "needs --purify-score)")
    args = p.parse_args(argv)
    score = config = None
    if args.purify_score:
        from pursamere_fast import PurifyConfig

        with option_errors(p, "--purify-score"):
            score = load_net(args.purify_score)
        with option_errors(p, "--purify-config"):
            fields = json.loads(args.purify_config or "{}")
            if not isinstance(fields, dict):
                raise ValueError(f"value must be a JSON object, got {args.purify_config!r}")
            config = PurifyConfig().with_overrides(**fields)
    elif args.purify_config:
        p.error("argument --purify-config: needs --purify-score")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    (images, labels), (test_x, test_y) = _load_datasets(p, args)
    torch.manual_seed(args.seed)
    model = SmallCNN(images.shape[1], 10, args.width, images.shape[-1])
    t0 = time.time()
    result = train_classifier(model, images, labels, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              out_dir=args.out, seed=args.seed, purify_score=score, purify_config=config,
                              resume=not args.no_resume, checkpoint_every=args.checkpoint_every,
                              progress=not args.no_progress)
    seconds = time.time() - t0
    acc = evaluate_classifier(result.model, test_x, test_y)
    metrics = {"kind": "classifier", "args": vars(args), "steps": result.step,
               "seconds_this_invocation": round(seconds, 1), "test_accuracy": acc, "test_n": int(len(test_y)),
               "purified_augmentation": bool(args.purify_score)}
    Path(args.out, "metrics.json").write_text(json.dumps(metrics, indent=2))
    save_net(result.model, Path(args.out) / "classifier.safetensors", {"training": json.dumps(metrics)})
    if args.export:
        save_net(result.model, args.export, {"training": json.dumps(metrics)})
    print(f"test accuracy {acc:.4f} on {len(test_y)} images")
    return 0
