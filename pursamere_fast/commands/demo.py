"""`pursamere-fast demo`: the whole defence on the shipped Fashion-MNIST defaults (see `pursamere_fast.demo`)."""

from __future__ import annotations

import os

import torch

from ..demo import SHIPPED_IMAGES, DemoConfig, run_demo
from ..purify import BACKENDS
from .options import ArgumentParser, device, integer, option_errors, real


def main(argv=None):
    p = ArgumentParser(prog="pursamere-fast demo",
                       description="`pursamere-fast demo`: the whole defence on the shipped Fashion-MNIST defaults.")
    p.add_argument("--n", type=integer(1, SHIPPED_IMAGES), default=256,
                   help=f"number of shipped test images (<= {SHIPPED_IMAGES})")
    p.add_argument("--out-dir", default="demo_out", help="where the PNGs go")
    p.add_argument("--eps", type=real(positive=True), default=8 / 255,
                   help="linf budget (a fraction such as 8/255 allowed)")
    p.add_argument("--pgd-steps", type=integer(1), default=10, help="gray-box PGD steps")
    p.add_argument("--bpda-steps", type=integer(1), default=5, help="BPDA-det PGD steps")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    with option_errors(p, "--out-dir"):
        os.makedirs(args.out_dir, exist_ok=True)
    return run_demo(DemoConfig(n=args.n, out_dir=args.out_dir, eps=args.eps, pgd_steps=args.pgd_steps,
                               bpda_steps=args.bpda_steps, backend=args.backend, device=args.device))

