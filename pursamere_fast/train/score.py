"""Score-model training: NCSN's multi-sigma denoising score matching with an EMA.

`train_score` keeps one checkpoint (`checkpoint.py`): model weights ("model.*"), the EMA
shadow ("ema.*"), Adam's state tensors ("optim.*"). A run started again with ``resume=True``
continues from it and ends with the same weights as a run that was never interrupted: every
step draws its batch and noise from a generator seeded by (seed, step), and the learning
rate is constant, so nothing else needs saving. `steps` may grow on a resume.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pursamere_fast import checks
from pursamere_fast.cli import ArgumentParser, integer, listed, real
from pursamere_fast.config import geometric_sigmas

from ._cli import common_args, load_datasets
from .checkpoint import (
    ResumeError,
    TrainResult,
    _device_of,
    _generator,
    _images,
    _load_model,
    _load_optim,
    _optim_tensors,
    _Run,
)


def _sigmas(sigmas) -> tuple[float, ...]:
    sigmas = checks.reals("sigmas", sigmas)
    if min(sigmas) <= 0:
        raise ValueError(f"sigmas must be positive numbers, got {sigmas}")
    return sigmas


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
        ValueError: bad arguments.
        ResumeError: (a ValueError) the checkpoint in `out_dir` was made with other
            hyperparameters, other images, for another model (class or `config`), or is past
            `steps`.
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
    # The network's class and constructor arguments: two ConvScoreNets that differ only in
    # dilations have the same weight shapes, so the state dict alone would not refuse a resume.
    net = {"arch": type(model).__name__, "config": json.loads(json.dumps(getattr(model, "config", None)))}
    hparams = {"sigmas": [float(s) for s in sig], "batch_size": batch_size, "lr": lr, "ema": ema,
               "seed": seed, "images": list(images.shape), "images_sum": round(float(images.double().sum()), 3),
               "net": net}
    run = _Run(out_dir, "score", hparams, resume)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    params = dict(model.named_parameters())
    shadow = {k: p.detach().clone() for k, p in params.items()}
    start = 0
    loaded = run.load()
    if loaded is not None:
        start, tensors = loaded
        if start > steps:
            raise ResumeError(f"checkpoint in {run.dir} is at step {start}, past steps={steps}")
        _load_model(model, tensors, "model.", run.ckpt)
        for k, v in shadow.items():
            v.copy_(tensors[f"ema.{k}"])
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


ARCHS = ("conv", "unet", "ncsnv2")
# Each architecture's own options and their defaults (None: the option is not given). The
# unet and ncsnv2 defaults are the largest members of their family within 1.5x the shipped
# conv net's CPU cost per score evaluation (unet 1.37x at width 24, ncsnv2 1.46x at ngf 4;
# width 32 costs 1.98x, ngf 6 2.02x; nets.py has the figures).
_ARCH_OPTIONS = {"conv": {"depth": 7, "dilations": [1, 2, 3, 4, 3, 2, 1]},
                 "unet": {"levels": 2, "blocks": 1},
                 "ncsnv2": {"ngf": 4}}
_WIDTH_DEFAULT = {"conv": 32, "unet": 24}


def _resolve_arch_options(p: argparse.ArgumentParser, args) -> None:
    """Fill in the --arch network's options' defaults; refuse another arch's options (before any
    data is read)."""
    for arch, options in _ARCH_OPTIONS.items():
        for name, default in options.items():
            if arch != args.arch and getattr(args, name) is not None:
                p.error(f"argument --{name}: only for --arch {arch}, got --arch {args.arch}")
            if arch == args.arch and getattr(args, name) is None:
                setattr(args, name, default)
    if args.arch == "ncsnv2" and args.width is not None:
        p.error("argument --width: not for --arch ncsnv2, whose width is --ngf")
    if args.arch != "ncsnv2" and args.width is None:
        args.width = _WIDTH_DEFAULT[args.arch]
    if args.arch == "conv" and len(args.dilations) != args.depth:
        p.error(f"argument --dilations: must be --depth ({args.depth}) integers, got {len(args.dilations)}")


def _build_score_net(p: argparse.ArgumentParser, args, image_shape) -> nn.Module:
    """The --arch network (options resolved) for images of `image_shape` (C, H, W)."""
    from pursamere_fast.nets import ConvScoreNet, NCSNv2ScoreNet, UNetScoreNet

    channels, height, width = image_shape
    if args.arch == "conv":
        return ConvScoreNet(channels, args.width, args.depth, dilations=args.dilations)
    if args.arch == "unet":
        if height % 2 ** args.levels or width % 2 ** args.levels:
            p.error(f"argument --levels: the {height}x{width} images' sides must be divisible by 2**{args.levels}")
        return UNetScoreNet(channels, args.width, args.levels, args.blocks)
    if height != width or height % 2:
        p.error(f"argument --arch: ncsnv2 needs square images of an even side, got {height}x{width}")
    return NCSNv2ScoreNet(height, channels, args.ngf)


def main_train_score(argv: Sequence[str] | None = None) -> int:
    """``pursamere-fast train-score``: train a score network, evaluate its denoising, export it."""
    from pursamere_fast.nets import save_net

    p = ArgumentParser(prog="pursamere-fast train-score", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train a score network (--arch) by multi-sigma denoising score matching, "
                                   "report its Tweedie denoising on test images (and on the held-out images "
                                   "with --holdout), export it. The defaults reproduce the shipped "
                                   "Fashion-MNIST score model.")
    common_args(p, width_default=None,
                width_help=f"conv: hidden channels ({_WIDTH_DEFAULT['conv']} if not given); unet: channels at "
                           f"full resolution ({_WIDTH_DEFAULT['unet']} if not given); not for ncsnv2 (--ngf)")
    p.add_argument("--arch", choices=ARCHS, default="conv",
                   help="conv: ConvScoreNet (plain dilated conv stack, the shipped model); unet: UNetScoreNet "
                        "(residual U-Net, 28 -> 14 -> 7); ncsnv2: NCSNv2 (RefineNet, InstanceNorm++) at --ngf. "
                        "All compute s(y, sigma) = body(2y - 1) / sigma with no normalization across the batch")
    p.add_argument("--depth", type=integer(2), default=None, help="conv: conv layers (7 if not given)")
    p.add_argument("--dilations", type=listed(integer(1)), default=None,
                   help="conv: comma-separated dilation per conv layer, --depth of them (1,2,3,4,3,2,1 if not given)")
    p.add_argument("--levels", type=integer(1), default=None,
                   help="unet: 2x downsamplings, the image side divisible by 2**levels (2 if not given)")
    p.add_argument("--blocks", type=integer(1), default=None,
                   help="unet: residual blocks per level and at the bottom (1 if not given)")
    p.add_argument("--ngf", type=integer(2), default=None, help="ncsnv2: base width ngf (4 if not given)")
    p.add_argument("--sigma-max", type=real(positive=True), default=1.0, help="largest sigma of the geometric ladder")
    p.add_argument("--sigma-min", type=real(positive=True), default=0.01, help="smallest sigma of the ladder")
    p.add_argument("--num-sigmas", type=integer(1), default=20, help="levels of the ladder")
    p.add_argument("--steps", type=integer(1), default=6000,
                   help="total optimizer steps (a resumed run goes up to it)")
    p.add_argument("--ema", type=real(0, 1), default=0.999, help="EMA decay of the exported weights, < 1")
    p.add_argument("--checkpoint-every", type=integer(1), default=250, help="steps between checkpoints")
    p.add_argument("--eval-n", type=integer(1), default=1000,
                   help="test images for the denoising figures (and held-out images, with --holdout)")
    args = p.parse_args(argv)
    _resolve_arch_options(p, args)
    if args.ema == 1:
        p.error(f"argument --ema: value must be a finite number >= 0 and < 1, got {args.ema!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    (images, _), (test, _), (held, _) = load_datasets(p, args, held_out=True)
    sigmas = geometric_sigmas(args.sigma_max, args.sigma_min, args.num_sigmas)
    torch.manual_seed(args.seed)
    model = _build_score_net(p, args, images.shape[1:])
    t0 = time.time()
    try:
        result = train_score(model, images, sigmas=sigmas, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, ema=args.ema, out_dir=args.out, seed=args.seed,
                             resume=not args.no_resume, checkpoint_every=args.checkpoint_every,
                             progress=not args.no_progress)
    except ResumeError as e:
        p.error(f"argument --out: {e}")
    seconds = time.time() - t0
    levels = (0.01, 0.05, 0.1, 0.25, 0.5)
    denoise = evaluate_denoiser(result.model, test[:args.eval_n], levels, seed=args.seed)
    metrics = {"kind": "score", "args": vars(args), "arch": type(model).__name__, "arch_config": model.config,
               "params": sum(q.numel() for q in model.parameters()), "train_images": len(images),
               "holdout": args.holdout,
               "sigmas": list(sigmas), "steps": result.step, "seconds_this_invocation": round(seconds, 1),
               "final_loss_mean_last_100": float(np.mean([v for _, v in result.losses[-100:]])),
               "denoising_test": {str(k): v for k, v in denoise.items()}}
    if len(held):
        # The last --eval-n held-out images (validation_split(eval_n)'s): what selection uses.
        val = evaluate_denoiser(result.model, held[-args.eval_n:], levels, seed=args.seed)
        metrics["denoising_validation"] = {str(k): v for k, v in val.items()}
    Path(args.out, "metrics.json").write_text(json.dumps(metrics, indent=2))
    save_net(result.model, Path(args.out) / "score_ema.safetensors", {"training": json.dumps(metrics)})
    if args.export:
        save_net(result.model, args.export, {"training": json.dumps(metrics)})
    for sigma, v in denoise.items():
        print(f"sigma={sigma:g}: tweedie mse {v['tweedie_mse']:.5f}  noisy mse {v['noisy_mse']:.5f}  (n={v['n']})")
    return 0
