"""``pursamere-fast score-quality``: denoising quality and CPU cost of score files, side by side."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data import holdout_split
from ..train.quality import SIGMAS, markdown, plot_quality, quality_rows
from .options import ArgumentParser, existing_file, integer, option_errors, random_seed


def main(argv: Sequence[str] | None = None) -> int:
    """``pursamere-fast score-quality``: denoising quality and CPU cost of score files, side by side."""
    from pursamere_fast.data import load_fashion_mnist
    from pursamere_fast.nets import load_net

    p = ArgumentParser(prog="pursamere-fast score-quality", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Tweedie denoising MSE (against the clean image) at sigma "
                                   + ", ".join(f"{s:g}" for s in SIGMAS)
                                   + ", parameters, FLOPs and CPU cost (score evaluation with its input gradient; "
                                     "one purify call with the shipped Fashion-MNIST config) of each score file, "
                                     "with ratios against the first one.")
    p.add_argument("--score", action="append", type=existing_file, required=True,
                   help="a score file written by save_net (repeat the option; the first is the baseline)")
    p.add_argument("--n", type=integer(1), default=1000, help="images for the denoising figures")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="test: the first --n test images; validation: the last --n training images "
                        "(the held-out validation split, for choosing between candidates)")
    p.add_argument("--data-root", default=None,
                   help="Fashion-MNIST directory (default: $PURSAMERE_FASHION_MNIST, "
                        "then /usr/share/datasets/fashion-mnist)")
    p.add_argument("--seed", type=random_seed, default=0, help="seed of the denoising noise z")
    p.add_argument("--out", default=None,
                   help="directory for quality.json, quality.md and quality.png (default: print only)")
    p.add_argument("--threads", type=integer(1), default=1, help="torch CPU threads for every measurement")
    p.add_argument("--batch", type=integer(1), default=64, help="rows per timed score evaluation")
    p.add_argument("--repeats", type=integer(1), default=9, help="timed rounds of the score evaluations (median)")
    p.add_argument("--purify-images", type=integer(1), default=None,
                   help="images per timed purify call (the first of the --n; 64 or --n if fewer, if not given)")
    p.add_argument("--purify-repeats", type=integer(1), default=3, help="timed rounds of the purify calls (median)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with option_errors(p, "--data-root"):
        pool, _ = load_fashion_mnist("test" if args.split == "test" else "train", args.data_root)
    if args.n > len(pool):
        p.error(f"argument --n: value must be at most the {len(pool)} images of the {args.split} pool, got {args.n}")
    if args.purify_images is None:
        args.purify_images = min(64, args.n)
    if args.purify_images > args.n:
        p.error(f"argument --purify-images: value must be at most --n ({args.n}), got {args.purify_images}")
    # validation: the last n training images (data.holdout_split), attacks.sweep.validation_split(n)'s.
    chosen = pool[:args.n] if args.split == "test" else holdout_split(pool, pool, args.n)[1][0]
    images = torch.from_numpy(chosen.copy())
    scores = []
    for path in args.score:
        with option_errors(p, "--score"):
            score = load_net(path)
            with torch.no_grad():
                try:
                    out = score(images[:1], torch.full((1,), 0.1))
                except RuntimeError as e:  # e.g. a conv built for other channels
                    raise ValueError(f"{path} does not take {tuple(images.shape[1:])} images: {e}") from None
            if out.shape != images[:1].shape:
                raise ValueError(f"{path} returns shape {tuple(out.shape)} for {tuple(images[:1].shape)} images")
        scores.append(score)
    rows = quality_rows(args.score, scores, images, seed=args.seed, batch=args.batch, repeats=args.repeats,
                        purify_images=args.purify_images, purify_repeats=args.purify_repeats)
    setup = (f"Fashion-MNIST {args.split} images: n = {len(images)} (seed {args.seed}); CPU cost: "
             f"{torch.get_num_threads()} thread(s), {torch.backends.cpu.get_cpu_capability()}, "
             f"torch {torch.__version__}, "
             f"score evaluation (forward + input gradient) at batch {args.batch}, median of {args.repeats} rounds; "
             f"purify: {args.purify_images} images, shipped config, median of {args.purify_repeats} rounds; "
             f"timed in alternation; (x) = ratio to the first row; (gain) = first row's MSE / this MSE.")
    table = markdown(rows, setup)
    if args.out:
        out = Path(args.out)
        with option_errors(p, "--out"):
            out.mkdir(parents=True, exist_ok=True)
            payload = {"setup": setup, "split": args.split, "threads": torch.get_num_threads(),
                       "rows": [{**r, **{k: {str(s): v for s, v in r[k].items()}
                                         for k in ("tweedie_mse", "noisy_mse", "mse_gain")}} for r in rows]}
            (out / "quality.json").write_text(json.dumps(payload, indent=2))
            (out / "quality.md").write_text(table)
            plot_quality(rows, out / "quality.png")
    print(table, end="")
    return 0
