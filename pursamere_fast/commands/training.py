"""Command-line pieces shared by `train-score` and `train-classifier`: their common options and data."""

from __future__ import annotations

import argparse

from ..data import holdout_split, load_cifar10, load_fashion_mnist
from .options import integer, option_errors, random_seed, real


def load_dataset(name: str, root: str | None, split: str):
    if name == "fashion-mnist":
        return load_fashion_mnist(split, root)
    if root is None:
        raise ValueError("required for --dataset cifar10")
    return load_cifar10(root, split)


def load_datasets(p: argparse.ArgumentParser, args, held_out: bool = False):
    """((train images, labels), (test images, labels)) of --dataset, the last --holdout training
    images left out of train; with `held_out`, those left-out images (the validation split) as a
    third pair. Bad --holdout or --data-root: the parser's one-line error."""
    with option_errors(p, "--data-root"):
        images, labels = load_dataset(args.dataset, args.data_root, "train")
        test = load_dataset(args.dataset, args.data_root, "test")
    n, k = len(images), args.holdout
    if k >= n:
        p.error(f"argument --holdout: value must be less than the {n} training images, got {k}")
    # data.holdout_split: the last k; k = 0 passes the arrays on untouched, so the shipped
    # models' training is unchanged.
    train, held = holdout_split(images, labels, k)
    return (train, test, held) if held_out else (train, test)


def common_args(p: argparse.ArgumentParser, lr_help: str = "Adam learning rate (constant)",
                width_default: int | None = 32, width_help: str = "hidden channels of the network") -> None:
    """The options both trainers take; `lr_help` describes --lr (whose default a trainer may
    override), `width_default` and `width_help` --width (a trainer whose default depends on
    another option passes None)."""
    p.add_argument("--out", required=True, help="run directory (checkpoint, loss.csv, loss.png, metrics.json)")
    p.add_argument("--dataset", choices=["fashion-mnist", "cifar10"], default="fashion-mnist", help="training data")
    p.add_argument("--data-root", default=None,
                   help="dataset directory (Fashion-MNIST default: $PURSAMERE_FASHION_MNIST, "
                        "then /usr/share/datasets/fashion-mnist)")
    p.add_argument("--width", type=integer(1), default=width_default, help=width_help)
    p.add_argument("--batch-size", type=integer(1), default=64, help="images per step")
    p.add_argument("--lr", type=real(positive=True), default=1e-3, help=lr_help)
    p.add_argument("--seed", type=random_seed, default=0, help="fixes initialization, data order and noise")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--export", default=None, help="also write the final weights (safetensors) here")
    p.add_argument("--threads", type=integer(1), default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--holdout", type=integer(0), default=0,
                   help="leave the last N training images out of training: the validation split "
                        "(attacks.sweep.validation_split(size) returns the last size <= N of them); "
                        "a resumed run must use the same N")
