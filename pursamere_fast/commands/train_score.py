"""``pursamere-fast train-score``: options to a score network and `train_score`."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import geometric_sigmas
from ..train.checkpoint import ResumeError
from ..train.score import evaluate_denoiser, train_score
from .options import ArgumentParser, integer, listed, real
from .training import common_args, load_datasets

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
