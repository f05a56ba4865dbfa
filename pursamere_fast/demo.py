"""The demo (`pursamere-fast demo`, `commands/demo.py`): the whole defence on the shipped Fashion-MNIST defaults.

Attacks shipped test images with gray-box PGD (the classifier alone) and BPDA-det (PGD
through classifier(purify(x)) with an identity backward and the defence's own fixed noise),
purifies, and prints clean / undefended / purified accuracies with the time per image.
Writes a PNG grid (clean | adversarial | purified | amplified difference) and a PNG of the
ERE traces.

The purifier runs the shipped config (`pursamere_fast.pretrained`), chosen on a validation
split: with 20 score evaluations per image the demo's 256 images take a few minutes on 2
CPU cores.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from . import Purifier, checks, purify
from .attacks import PurifiedClassifier, pgd
from .pretrained import fashion_mnist
from .purify import BACKENDS

# The shipped Fashion-MNIST test subset (pursamere_fast.pretrained) holds this many images.
SHIPPED_IMAGES = 1000


def _accuracy(classifier, x, y, batch=256):
    with torch.no_grad():
        preds = torch.cat([classifier(xb).argmax(1) for xb in x.split(batch)])
    return (preds == y).float().mean().item()


def _purify_timed(x, d, backend):
    t0 = time.perf_counter()
    x_pur, ere = purify(x, d.score, d.config, backend=backend, return_ere=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return x_pur, ere, time.perf_counter() - t0


def save_grid(path, clean, adv, pur, n=8):
    """PNG: rows of clean | adversarial | purified | |purified - clean| amplified x5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(clean))
    cols = [("clean", clean), ("adversarial", adv), ("purified", pur),
            ("|purified - clean| x5", (pur - clean).abs() * 5)]
    fig, axes = plt.subplots(n, 4, figsize=(6, 1.5 * n))
    for i in range(n):
        for j, (title, imgs) in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(imgs[i].clamp(0, 1).permute(1, 2, 0).squeeze(-1).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_ere_plot(path, traces, sigmas):
    """PNG: mean ERE (with 10-90% band) before each step, one line per input kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = range(len(sigmas))
    for label, ere in traces.items():
        ere = ere.cpu()
        ax.plot(steps, ere.mean(0), label=label)
        ax.fill_between(steps, ere.quantile(0.1, dim=0), ere.quantile(0.9, dim=0), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("step k")
    ax.set_ylabel("ERE e_sigma_k(x) before step k")
    ax.set_title("PurSAMERE ERE traces (sigma annealed " + f"{sigmas[0]:.3g} -> {sigmas[-1]:.3g})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings, checked at construction.

    Attributes:
        n: shipped test images (1..SHIPPED_IMAGES). out_dir: where the PNGs go.
        eps: linf budget. pgd_steps: gray-box PGD steps. bpda_steps: BPDA-det PGD steps.
        backend: purify backend. device: where to run.
    """

    n: int = 256
    out_dir: str = "demo_out"
    eps: float = 8 / 255
    pgd_steps: int = 10
    bpda_steps: int = 5
    backend: str = "auto"
    device: str = "cpu"

    def __post_init__(self):
        checks.integer("n", self.n, 1, SHIPPED_IMAGES)
        checks.real("eps", self.eps, positive=True)
        checks.integer("pgd_steps", self.pgd_steps, 1)
        checks.integer("bpda_steps", self.bpda_steps, 1)
        checks.choice("backend", self.backend, BACKENDS)


def run_demo(config: DemoConfig) -> int:
    """Attack, purify and report as the module docstring says; print the table, write the PNGs.

    Returns:
        0 (the process exit code of the command).
    """
    os.makedirs(config.out_dir, exist_ok=True)
    d = fashion_mnist(device=config.device)
    x, y = d.images[: config.n], d.labels[: config.n]
    alpha = config.eps / 4
    t_start = time.perf_counter()
    with tqdm(total=5, desc="demo", unit="phase") as bar:
        bar.set_postfix_str("gray-box PGD")
        adv_gray = pgd(d.classifier, x, y, norm="linf", eps=config.eps, alpha=alpha, steps=config.pgd_steps)
        bar.update()
        bar.set_postfix_str("purify clean")
        pur_clean, ere_clean, t_clean = _purify_timed(x, d, config.backend)
        bar.update()
        bar.set_postfix_str("purify gray-box")
        pur_gray, ere_gray, t_gray = _purify_timed(adv_gray, d, config.backend)
        bar.update()
        bar.set_postfix_str("BPDA-det PGD")
        bpda = Purifier(d.score, d.config, grad_mode="bpda", backend=config.backend)
        defended = PurifiedClassifier(bpda, d.classifier)
        adv_bpda = pgd(defended, x, y, norm="linf", eps=config.eps, alpha=alpha, steps=config.bpda_steps)
        bar.update()
        bar.set_postfix_str("purify BPDA-det")
        pur_bpda, ere_bpda, t_bpda = _purify_timed(adv_bpda, d, config.backend)
        bar.update()
    total = time.perf_counter() - t_start

    sec_per_image = (t_clean + t_gray + t_bpda) / (3 * len(x))
    rows = [
        ("clean, undefended", _accuracy(d.classifier, x, y)),
        ("clean, purified", _accuracy(d.classifier, pur_clean, y)),
        (f"gray-box PGD-{config.pgd_steps}, undefended", _accuracy(d.classifier, adv_gray, y)),
        (f"gray-box PGD-{config.pgd_steps}, purified", _accuracy(d.classifier, pur_gray, y)),
        (f"BPDA-det PGD-{config.bpda_steps}, undefended", _accuracy(d.classifier, adv_bpda, y)),
        (f"BPDA-det PGD-{config.bpda_steps}, purified", _accuracy(d.classifier, pur_bpda, y)),
    ]
    print(f"\nFashion-MNIST, n={len(x)}, linf eps={config.eps:.4f}, alpha={alpha:.4f}, device={config.device}, "
          f"K={d.config.num_steps}, N={d.config.n_samples}, SAM r={d.config.sam_radius:.4f}, rho={d.config.rho:.4f}")
    print(f"| {'setting':<34} | accuracy |")
    print(f"|{'-' * 36}|----------|")
    for name, acc in rows:
        print(f"| {name:<34} | {acc:8.3f} |")
    print(f"purify: {sec_per_image * 1e3:.1f} ms per image; whole demo {total:.1f} s")

    grid_path = os.path.join(config.out_dir, "demo_grid.png")
    ere_path = os.path.join(config.out_dir, "demo_ere.png")
    save_grid(grid_path, x, adv_bpda, pur_bpda)
    save_ere_plot(ere_path, {"clean": ere_clean, "gray-box PGD": ere_gray, "BPDA-det": ere_bpda},
                  d.config.step_sigmas())
    print(f"wrote {grid_path} and {ere_path}")
    return 0
