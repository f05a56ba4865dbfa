"""Classifier training: cross-entropy with Adam, SGD or a SAM-family optimiser (SPEC 9), and
optionally an input-gradient regulariser (SPEC 10): local flatness (LFR), the clean-point
gradient penalty, or PGD adversarial training (`RegulariserConfig`, `lfr.py`).

`train_classifier` keeps one checkpoint (`checkpoint.py`): model weights ("model.*") and the
optimiser's state tensors ("optim.*": Adam moments, SGD momentum buffers; a SAM wrapper's
state is its base's). A run started again with ``resume=True`` ends with the same weights as
one never interrupted: each epoch's data order comes from a generator seeded by
(seed, epoch), a regulariser's random starts from one seeded by (seed, step), and the
learning rate and SSE-SAM's head radius are functions of the step, so nothing else needs
saving. A resume with other hyperparameters, optimiser or regulariser settings is refused;
`epochs` may grow, except where the schedule depends on it (cosine learning rate, SSE-SAM's
phase switch at gamma * epochs).

The defaults (Adam, constant learning rate, no weight decay, no regulariser, no augmentation,
SmallCNN) are the trainer that made the shipped Fashion-MNIST classifier, step for step. The
CIFAR-10 protocol (docs/protocol.md) trains a WideResNet with SGD, a cosine schedule, random
crops and flips (`augment="crop-flip"`, drawn from a generator seeded by (seed, step)) and,
for the augmented classifier, purified augmentation through an official NCSNv2 checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pursamere_fast import checks
from pursamere_fast.optim import SAM, SSESAM, ImbSAM, stage_rho_head

from .checkpoint import (
    ResumeError,
    RunDirectory,
    TrainResult,
    as_image_tensor,
    load_model_tensors,
    load_optimizer,
    model_device,
    optimizer_tensors,
    step_generator,
)
from .lfr import gradient_penalty, lfr_penalty, pgd_examples
from .longtail import tail_classes

OPTIMIZERS = ("adam", "sgd", "sam", "imbsam", "ssesam")
SCHEDULES = ("constant", "cosine")
# The fields each optimiser reads besides name, weight_decay and schedule (which all read).
# Only these go into a checkpoint's settings, so an unused value cannot block a resume.
FIELDS_USED = {
    "adam": (),
    "sgd": ("momentum",),
    "sam": ("momentum", "rho"),
    "imbsam": ("momentum", "rho", "tail_threshold"),
    "ssesam": ("momentum", "rho_head", "rho_tail", "gamma", "tail_threshold"),
}
# Default learning rates: Adam's made the shipped classifier; SGD's is the benchmark's
# (docs/optim.md), stable for SmallCNN at batch 128 with momentum 0.9.
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05, "sam": 0.05, "imbsam": 0.05, "ssesam": 0.05}

REGULARISERS = ("none", "lfr", "gradpen", "pgd-at")
# The command line's networks: SmallCNN (the shipped Fashion-MNIST classifier's) and WideResNet
# (the CIFAR-10 protocol's WRN-28-10, depth and width options).
ARCHS = ("smallcnn", "wrn")
WRN_DEPTH, WRN_WIDEN = 28, 10
# The fields each regulariser reads besides its name; only these go into a checkpoint.
REGULARISER_FIELDS_USED = {"none": (), "lfr": ("eps", "alpha", "steps", "lam"), "gradpen": ("lam",),
                            "pgd-at": ("eps", "alpha", "steps")}
# The optimisers a regulariser runs with: a SAM-family step would need the inner maximisation
# redone at the perturbed weights, which SPEC 10 does not define.
REGULARISED_OPTIMIZERS = ("adam", "sgd")
# The last word of the regulariser's (seed, step, 1) generator seed: SeedSequence pads with
# zeros, so the data order's (seed, epoch), read as (seed, epoch, 0), never equals it.
_REGULARISER_STREAM = 1
# The same for the crops and flips of `augment="crop-flip"`: (seed, step, 2).
_AUGMENT_STREAM = 2
AUGMENTS = ("none", "crop-flip")
# crop-flip: the standard CIFAR-10 augmentation (He et al. 2016; RobustBench's training
# scripts): zero-pad 4 pixels per side, crop back to the input size at a uniform offset, flip
# left-right with probability 1/2.
_CROP_PAD = 4


@dataclass(frozen=True)
class OptimizerConfig:
    """How `train_classifier` updates the weights.

    Attributes:
        name: "adam" (torch Adam), "sgd" (torch SGD), or "sam", "imbsam", "ssesam"
            (`pursamere_fast.optim` wrappers around that SGD).
        weight_decay: L2 weight decay of the base optimiser.
        schedule: "constant" learning rate, or "cosine": lr * (1 + cos(pi * step / steps)) / 2.
        momentum: SGD momentum in [0, 1) (all but adam).
        rho: the ascent radius of sam and imbsam (imbsam: the tail radius).
        rho_head, rho_tail: ssesam's radii; rho_head drops to 0 from epoch gamma * epochs on.
        gamma: ssesam's fraction of the epochs in phase 1, in [0, 1].
        tail_threshold: imbsam and ssesam: the tail classes have fewer than this many
            training samples (1000: the Medium and Few classes of Fashion-MNIST-LT at R = 100).

    Raises:
        ValueError: a field out of range, naming it.
    """

    name: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "constant"
    momentum: float = 0.9
    rho: float = 0.05
    rho_head: float = 0.05
    rho_tail: float = 0.10
    gamma: float = 0.7
    tail_threshold: int = 1000

    def __post_init__(self):
        checks.choice("name", self.name, OPTIMIZERS)
        checks.choice("schedule", self.schedule, SCHEDULES)
        checked = {"weight_decay": checks.real("weight_decay", self.weight_decay, 0),
                   "momentum": checks.real("momentum", self.momentum, 0, 1),
                   "rho": checks.real("rho", self.rho, 0),
                   "rho_head": checks.real("rho_head", self.rho_head, 0),
                   "rho_tail": checks.real("rho_tail", self.rho_tail, 0),
                   "gamma": checks.real("gamma", self.gamma, 0, 1),
                   "tail_threshold": checks.integer("tail_threshold", self.tail_threshold, 1)}
        # momentum = 1 never forgets a gradient: the weights would run away.
        if checked["momentum"] == 1:
            raise ValueError(f"momentum must be a finite number >= 0 and < 1, got {self.momentum!r}")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def splits_head_tail(self) -> bool:
        """Whether the closure returns (loss_head, loss_tail)."""
        return self.name in ("imbsam", "ssesam")

    @property
    def needs_epochs(self) -> bool:
        """Whether the step-by-step trajectory depends on the total number of epochs."""
        return self.schedule == "cosine" or self.name == "ssesam"

    def used(self) -> dict:
        """The settings this optimiser reads: what a checkpoint must agree on."""
        return {k: v for k, v in asdict(self).items()
                if k in ("name", "weight_decay", "schedule") or k in FIELDS_USED[self.name]}

    def build(self, params, lr: float) -> torch.optim.Optimizer:
        """The optimiser over `params` at learning rate `lr`."""
        if self.name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=self.weight_decay)
        base = torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.name == "sgd":
            return base
        if self.name == "sam":
            return SAM(base, rho=self.rho)
        if self.name == "imbsam":
            return ImbSAM(base, rho=self.rho)
        return SSESAM(base, rho_head=self.rho_head, rho_tail=self.rho_tail)


@dataclass(frozen=True)
class RegulariserConfig:
    """What `train_classifier` adds to, or puts in place of, the cross-entropy (SPEC 10).

    Attributes:
        name: "none" (plain cross-entropy), "lfr" (CE(f(x), y) + lam * mean `lfr_penalty`),
            "gradpen" (CE + lam * mean `gradient_penalty`: the penalty at the clean point, the
            control for LFR's inner maximisation) or "pgd-at" (CE(f(x_adv), y) at
            `pgd_examples`: Madry adversarial training).
        eps, alpha, steps: linf radius, step size and steps of the inner maximisation (lfr,
            pgd-at; the same for both so that budgets compare). The defaults suit
            Fashion-MNIST (eps 0.1, its usual linf budget; 10 steps of 0.01 reach the ball's
            surface); SPEC 10's MNIST setting is 0.3, 0.01, 40, its CIFAR-10 one 8/255, 0.007, 10.
        lam: weight of the penalty (lfr, gradpen); 0.02 is SPEC 10's MNIST value.

    Raises:
        ValueError: a field out of range, naming it.
    """

    name: str = "none"
    eps: float = 0.1
    alpha: float = 0.01
    steps: int = 10
    lam: float = 0.02

    def __post_init__(self):
        checks.choice("name", self.name, REGULARISERS)
        checked = {"eps": checks.real("eps", self.eps, 0), "alpha": checks.real("alpha", self.alpha, 0),
                   "steps": checks.integer("steps", self.steps, 0), "lam": checks.real("lam", self.lam, 0)}
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def used(self) -> dict:
        """The settings this regulariser reads: what a checkpoint must agree on."""
        return {k: v for k, v in asdict(self).items() if k == "name" or k in REGULARISER_FIELDS_USED[self.name]}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The batch's training loss under this regulariser.

        Args:
            model: the classifier, in the mode it trains in.
            x: float (B, C, H, W) images in [0, 1]; y: integer labels (B,).
            generator: CPU generator of the random starts (lfr, pgd-at).

        Returns:
            The scalar loss to minimise.
        """
        if self.name == "pgd-at":
            x_adv = pgd_examples(model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps, generator=generator)
            return F.cross_entropy(model(x_adv), y)
        if self.name == "lfr":
            penalty, _ = lfr_penalty(model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps,
                                     generator=generator)
        elif self.name == "gradpen":
            penalty = gradient_penalty(model, x, y)
        else:
            return F.cross_entropy(model(x), y)
        return F.cross_entropy(model(x), y) + self.lam * penalty.mean()


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = _CROP_PAD) -> torch.Tensor:
    """Random crops of the zero-padded images and random left-right flips, per image.

    Args:
        x: (B, C, H, W) images.
        generator: CPU generator of the offsets (B of them in [0, 2 pad] per axis) and flips.
        pad: zero padding per side.

    Returns:
        (B, C, H, W) on x's device: image b is padded[b, :, i_b:i_b + H, j_b:j_b + W], reversed
        along W where flipped.
    """
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    cols = torch.arange(w).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = (offsets[0, :, None] + torch.arange(h)).to(x.device)
    cols = (offsets[1, :, None] + cols).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    # One gather: out[b, c, i, j] = padded[b, c, rows[b, i], cols[b, j]].
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def train_classifier(model: nn.Module, images, labels, *, epochs: int, batch_size: int, lr: float,
                     out_dir: str | os.PathLike, seed: int, purify_score: Callable | None = None,
                     purify_config=None, optimizer: OptimizerConfig | None = None,
                     regulariser: RegulariserConfig | None = None, augment: str = "none", resume: bool = True,
                     checkpoint_every: int = 200, progress: bool = True) -> TrainResult:
    """Train a classifier with cross-entropy, optionally with purified augmentation.

    Each epoch visits the images in an order drawn from (seed, epoch). With `augment="crop-flip"`
    each batch is first randomly cropped and flipped (`crop_flip`, generator seeded by
    (seed, step)). With `purify_score`, each (augmented) batch is also purified (PurSAMERE with
    SAM off, as the paper's classifier training) and the loss is CE(clean) + CE(purified); the
    purification's own noise is fixed by the config's seed. Without crops and flips the images
    are purified once, before the first step, and reused every epoch (`_purified_set`,
    out_dir/purified.npy).
    With imbsam or ssesam the per-sample losses are split by class into L_H and L_T (each a sum
    over its samples divided by the batch size, SPEC 9); the tail classes are those with fewer
    than `optimizer.tail_threshold` samples in `labels`. The logged loss is the batch's mean
    cross-entropy at the unperturbed weights for every optimiser; with a regulariser, the loss
    it minimises (lfr, gradpen: CE + lam * mean penalty; pgd-at: the CE at the PGD examples),
    whose random starts come from a generator seeded by (seed, step).

    Args:
        model: classifier from [0, 1] images to logits, trained in place; on its device.
        images: float (N, C, H, W) in [0, 1]; labels: integer (N,).
        epochs, batch_size: as usual (the last batch of an epoch may be smaller).
        lr: the (peak) learning rate.
        out_dir: checkpoint, loss.csv and loss.png go here.
        seed: fixes the data order.
        purify_score: score(y, sigma) for purified augmentation, or None.
        purify_config: PurifyConfig for it (None: the default config).
        optimizer: the update rule (None: OptimizerConfig(), Adam at a constant `lr`).
        regulariser: RegulariserConfig (None: none); any but "none" needs optimizer adam or
            sgd and no `purify_score`.
        augment: "none" or "crop-flip" (see above).
        resume: continue from `out_dir`'s checkpoint if there is one.
        checkpoint_every: steps between checkpoints (also at each epoch's end).
        progress: show a tqdm bar.

    Returns:
        TrainResult with the trained model.

    Raises:
        ValueError: bad arguments.
        ResumeError: (a ValueError) the checkpoint in `out_dir` was made with other
            hyperparameters, optimiser, regulariser or augmentation settings, for another model,
            or is past `epochs`.
    """
    images = as_image_tensor(images)
    labels = checks.labels("labels", torch.as_tensor(labels), images.shape[0]).long()
    epochs = checks.integer("epochs", epochs, 1)
    batch_size = checks.integer("batch_size", batch_size, 1)
    lr = checks.real("lr", lr, positive=True)
    checkpoint_every = checks.integer("checkpoint_every", checkpoint_every, 1)
    seed = checks.seed("seed", seed)
    optimizer = OptimizerConfig() if optimizer is None else optimizer
    if not isinstance(optimizer, OptimizerConfig):
        # A ValueError naming the argument, as every bad input here (STYLE.md).
        raise ValueError(f"optimizer must be an OptimizerConfig or None, got {type(optimizer).__name__}")  # noqa: TRY004
    regulariser = RegulariserConfig() if regulariser is None else regulariser
    if not isinstance(regulariser, RegulariserConfig):
        raise ValueError(f"regulariser must be a RegulariserConfig or None, got {type(regulariser).__name__}")  # noqa: TRY004
    augment = checks.choice("augment", augment, AUGMENTS)
    regularised = regulariser.name != "none"
    if regularised and optimizer.name not in REGULARISED_OPTIMIZERS:
        raise ValueError(f"regulariser {regulariser.name!r} needs optimizer {' or '.join(REGULARISED_OPTIMIZERS)}, "
                         f"got {optimizer.name!r}")
    if regularised and purify_score is not None:
        raise ValueError(f"regulariser {regulariser.name!r} does not combine with purify_score")
    device = model_device(model)
    config_desc = None
    if purify_score is not None:
        from pursamere_fast import PurifyConfig, purify

        purify_config = PurifyConfig() if purify_config is None else purify_config
        config_desc = repr(purify_config)
    hparams = {"batch_size": batch_size, "lr": lr, "seed": seed, "images": list(images.shape),
               "images_sum": round(float(images.double().sum()), 3), "labels_sum": int(labels.sum()),
               "purify_config": config_desc, "optimizer": optimizer.used()}
    if optimizer.needs_epochs:
        hparams["epochs"] = epochs
    if regularised:  # absent otherwise: runs from before the option still resume
        hparams["regulariser"] = regulariser.used()
    if augment != "none":  # the same
        hparams["augment"] = augment
    run = RunDirectory(out_dir, "classifier", hparams, resume)
    opt = optimizer.build(model.parameters(), lr)
    n = images.shape[0]
    per_epoch = math.ceil(n / batch_size)
    total = epochs * per_epoch
    is_tail = torch.zeros(int(labels.max()) + 1, dtype=torch.bool)
    if optimizer.splits_head_tail:
        is_tail[tail_classes(labels, optimizer.tail_threshold)] = True
    is_tail = is_tail.to(device)
    start = 0
    loaded = run.load()
    if loaded is not None:
        start, tensors = loaded
        if start > total:
            raise ResumeError(f"checkpoint in {run.dir} is at step {start}, past epochs={epochs} ({total} steps)")
        load_model_tensors(model, tensors, "model.", run.ckpt)
        load_optimizer(opt, tensors)

    def state() -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in model.state_dict().items()}
        out.update(optimizer_tensors(opt))
        return out

    purified = None
    if purify_score is not None and augment == "none" and start < total:
        purified = _purified_set(images, purify, purify_score, purify_config, run.dir, hparams, device, resume,
                                 progress)
    model.train()
    perm_epoch, perm = -1, None
    bar = tqdm(total=total, initial=start, disable=not progress, desc="train-classifier", dynamic_ncols=True)
    for step in range(start, total):
        epoch, b = divmod(step, per_epoch)
        if epoch != perm_epoch:
            perm_epoch, perm = epoch, torch.randperm(n, generator=step_generator(seed, epoch))
        idx = perm[b * batch_size:(b + 1) * batch_size]
        x, y = images[idx].to(device), labels[idx].to(device)
        if augment == "crop-flip":
            x = crop_flip(x, step_generator(seed, step, _AUGMENT_STREAM))
        x_pur = None
        if purified is not None:
            x_pur = purified[idx].to(device)
        elif purify_score is not None:
            with torch.no_grad():
                x_pur = purify(x, purify_score, purify_config, sam_radius=0.0)

        def batch_loss(reduction: str = "mean", x=x, y=y, x_pur=x_pur) -> torch.Tensor:
            loss = F.cross_entropy(model(x), y, reduction=reduction)
            if x_pur is not None:
                loss = loss + F.cross_entropy(model(x_pur), y, reduction=reduction)
            return loss

        if optimizer.schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
        if optimizer.name in ("adam", "sgd"):
            if regularised:
                loss = regulariser.loss(model, x, y, step_generator(seed, step, _REGULARISER_STREAM))
            else:
                loss = batch_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        elif optimizer.name == "sam":
            loss = opt.step(batch_loss)
        else:
            if optimizer.name == "ssesam":
                opt.rho_head = stage_rho_head(epoch, epochs, optimizer.rho_head, optimizer.gamma)
            tail = is_tail[y]

            def head_tail(y=y, tail=tail) -> tuple[torch.Tensor, torch.Tensor]:
                per_sample = batch_loss("none")
                return per_sample[~tail].sum() / len(y), per_sample[tail].sum() / len(y)

            loss_head, loss_tail = opt.step(head_tail)
            loss = loss_head.detach() + loss_tail.detach()
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


# Images per purify call of `_purified_set`: a constant, because the score network's rounding can
# depend on the batch size and a resumed run must purify exactly as an uninterrupted one.
_PURIFY_CHUNK = 500
PURIFIED, PURIFIED_STATE = "purified.npy", "purified.json"


@torch.no_grad()
def _purified_set(images: torch.Tensor, purify: Callable, score: Callable, config, out_dir: Path, hparams: dict,
                  device: torch.device, resume: bool, progress: bool) -> torch.Tensor:
    """purify(x) with SAM off of every training image, in index order, `_PURIFY_CHUNK` at a time.

    Without crops or flips a training image is the same every epoch, and its purification is
    deterministic (its noise is fixed by the config's seed), so each image is purified once
    rather than once per epoch: 1/epochs of the cost, the same values up to the rounding of the
    batch size. The set grows on disk (out_dir/purified.npy, its progress in purified.json,
    written after each chunk), so a run killed while purifying continues where it stopped and
    one killed while training reuses the whole set.
    """
    import numpy as np

    path, state_path = out_dir / PURIFIED, out_dir / PURIFIED_STATE
    done = 0
    if resume and state_path.is_file() and path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("hparams") == hparams:
            done = int(state["done"])
    if done == 0:
        state_path.unlink(missing_ok=True)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(images.shape)).flush()
    out = np.load(path, mmap_mode="r+")
    n = images.shape[0]
    bar = tqdm(total=n, initial=done, disable=not progress or done >= n, desc="purify training set",
               unit="image", dynamic_ncols=True)
    for lo in range(done, n, _PURIFY_CHUNK):
        hi = min(n, lo + _PURIFY_CHUNK)
        x = images[lo:hi].to(device)
        out[lo:hi] = purify(x, score, config, sam_radius=0.0).float().cpu().numpy()
        out.flush()
        state_path.write_text(json.dumps({"done": hi, "hparams": hparams}))
        bar.update(hi - lo)
    bar.close()
    return torch.from_numpy(np.array(out))


@torch.no_grad()
def _predictions(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = model_device(model)
    model.eval()
    return torch.cat([model(images[i:i + batch_size].to(device)).argmax(1).cpu()
                      for i in range(0, images.shape[0], batch_size)])


def evaluate_classifier(model: nn.Module, images, labels, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` on (images, labels).

    Raises:
        ValueError: images not float (N, C, H, W) in [0, 1], or labels not (N,).
    """
    images = as_image_tensor(images)
    labels = checks.labels("labels", torch.as_tensor(labels), images.shape[0])
    batch_size = checks.integer("batch_size", batch_size, 1)
    correct = int((_predictions(model, images, batch_size) == labels).sum())
    return correct / images.shape[0]


def per_class_accuracy(model: nn.Module, images, labels, num_classes: int | None = None,
                       batch_size: int = 500) -> list[float]:
    """Top-1 accuracy of `model` on the images of each class.

    Args:
        model: classifier from [0, 1] images to logits.
        images: float (N, C, H, W) in [0, 1]; labels: integer (N,).
        num_classes: classes to report (None: max(labels) + 1).
        batch_size: images per forward.

    Returns:
        Accuracy of class 0, 1, ..., num_classes - 1 (NaN for a class with no image).

    Raises:
        ValueError: images not float (N, C, H, W) in [0, 1], labels not (N,) in [0, num_classes).
    """
    images = as_image_tensor(images)
    if num_classes is not None:
        num_classes = checks.integer("num_classes", num_classes, 1)
    labels = checks.labels("labels", torch.as_tensor(labels), images.shape[0], num_classes).long()
    batch_size = checks.integer("batch_size", batch_size, 1)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    hit = (_predictions(model, images, batch_size) == labels).double()
    correct = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, hit)
    count = torch.bincount(labels, minlength=num_classes).double()
    return (correct / count).tolist()


def load_purify_score(path: str, channels: int, image_size: int) -> nn.Module:
    """A score model for purified augmentation: an official NCSNv2 checkpoint (.pth, .pt; its
    architecture read from the file, at the training images' size) or a `save_net` file.

    Raises:
        ValueError: a file that is neither, or an NCSNv2 of other channels than `channels`.
    """
    from pursamere_fast.nets import load_net

    if not path.endswith((".pth", ".pt")):
        return load_net(path)
    from pursamere_fast.scores import ncsnv2_score

    score = ncsnv2_score(path, image_size=image_size)
    if score.model.channels != channels:
        raise ValueError(f"{path} is an NCSNv2 of {score.model.channels} channels, the images have {channels}")
    return score
