"""`pursamere-fast example`: purify shipped Fashion-MNIST test images; print timing and the ERE trace."""

from __future__ import annotations

import time

import torch

from ..demo import SHIPPED_IMAGES
from ..pretrained import fashion_mnist
from ..purify import BACKENDS, purify
from .options import ArgumentParser, device, integer


def main(argv):
    p = ArgumentParser(prog="pursamere-fast example",
                       description="Purify shipped Fashion-MNIST test images; print timing and the ERE trace.")
    p.add_argument("--n", type=integer(1, SHIPPED_IMAGES), default=16,
                   help=f"number of shipped test images (<= {SHIPPED_IMAGES})")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", type=device, default="cpu")
    args = p.parse_args(argv)
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
