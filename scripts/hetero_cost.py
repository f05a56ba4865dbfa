"""Cost per purified image of each purifier (ms), same process, 1 thread, batch 32, 3 alternated rounds.

    OMP_NUM_THREADS=1 python scripts/hetero_cost.py
"""

import json
import statistics
import time

import torch

from pursamere_fast import purify
from pursamere_fast.pretrained import fashion_mnist
from pursamere_fast.purifiers import ADPPurifier, HeteroPurifier


def main():
    torch.set_num_threads(1)
    d = fashion_mnist(release="v1")  # the release docs/hetero.md measured
    x = d.images[:32]
    het = HeteroPurifier(d.score, d.classifier, t_l=200, t_s=100, resample_steps=3, grid_steps=100, tau=0.9)
    adp = ADPPurifier(d.score, sigma=0.05, noise_std=0.05, steps=5)
    cfg = d.config.with_overrides(sam_radius=0.0)
    fns = {"pursamere (shipped, SAM off)": lambda: purify(x, d.score, cfg),
           "adp (sigma 0.05, 5 steps)": lambda: adp(x),
           "hetero, one run": lambda: het(x),
           "hetero, vote over R = 5": lambda: het.purify_runs(x, 5)}
    times = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():  # warm-up
            f()
        for _ in range(3):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    print(json.dumps({k: 1000 * statistics.median(v) / x.shape[0] for k, v in times.items()}, indent=1))


if __name__ == "__main__":
    main()
