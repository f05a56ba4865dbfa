"""The `pursamere-fast` command line: demo, example, training and evaluation."""

from __future__ import annotations

import argparse
import sys
import time


def _example(argv):
    p = argparse.ArgumentParser(prog="pursamere-fast example",
                                description="Purify shipped Fashion-MNIST test images; print timing and the ERE trace.")
    p.add_argument("--n", type=int, default=16, help="number of images")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    import torch

    from . import purify
    from .pretrained import fashion_mnist

    d = fashion_mnist(device=args.device)
    x = d.images[: args.n]
    t0 = time.perf_counter()
    x_pur, ere = purify(x, d.score, d.config, backend=args.backend, return_ere=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    with torch.no_grad():
        acc_in = (d.classifier(x).argmax(1) == d.labels[: args.n]).float().mean().item()
        acc_out = (d.classifier(x_pur).argmax(1) == d.labels[: args.n]).float().mean().item()
    print(f"purified {len(x)} images in {dt:.2f} s ({len(x) / dt:.1f} images/s, backend={args.backend}, "
          f"K={d.config.num_steps}, N={d.config.n_samples})")
    print(f"classifier accuracy: input {acc_in:.3f}, purified {acc_out:.3f}")
    print("mean ERE before step k:")
    for k, (s, e) in enumerate(zip(d.config.step_sigmas(), ere.mean(0).tolist())):
        print(f"  k={k:3d} sigma={s:.4f} ere={e:.3f}")
    return 0


COMMANDS = {
    "example": ("pursamere_fast.cli", "_example"),
    "demo": ("pursamere_fast.demo", "main"),
    "train-score": ("pursamere_fast.train", "main_train_score"),
    "train-classifier": ("pursamere_fast.train", "main_train_classifier"),
    "evaluate": ("pursamere_fast.attacks", "main_evaluate"),
    "sanity": ("pursamere_fast.attacks", "main_sanity"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: pursamere-fast {" + ",".join(COMMANDS) + "} [options]  (each takes --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module, name = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), name)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
