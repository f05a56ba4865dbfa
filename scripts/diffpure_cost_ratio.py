"""Issue 41, item 3: the cost of one DiffPure purification (t* 0.1, S 20 and 50) and of the
heterogeneous purifier's chosen point (t_l 200, t_s 100, S 50, the R = 5 runs of its vote) against
the PurSAMERE default's, the first 32 shipped test images, 3 alternating rounds after a warm-up, one
process (run with OMP_NUM_THREADS=1). Its output is in results/fmnist_protocol/diffpure/README.md."""
import time

import torch

from pursamere_fast import purify
from pursamere_fast.pretrained import fashion_mnist
from pursamere_fast.purifiers import DiffPurePurifier, HeteroPurifier

torch.set_num_threads(1)
d = fashion_mnist()
x = d.images[:32]
fns = {"pursamere_default": lambda: purify(x, d.score, d.config),
       "diffpure_S20": (lambda p: (lambda: p(x)))(DiffPurePurifier(d.score, t_star=0.1, steps=20)),
       "diffpure_S50": (lambda p: (lambda: p(x)))(DiffPurePurifier(d.score, t_star=0.1, steps=50)),
       "hetero_S50_R5": (lambda p: (lambda: p.purify_runs(x, 5)))(
           HeteroPurifier(d.score, d.classifier, t_l=200, t_s=100, grid_steps=50, seed=0))}
for f in fns.values():
    with torch.no_grad():
        f()  # warm-up
times = {k: [] for k in fns}
for _ in range(3):
    for k, f in fns.items():
        t = time.perf_counter()
        with torch.no_grad():
            f()
        times[k].append(time.perf_counter() - t)
for k, v in times.items():
    s = sorted(v)
    ratio = s[1] / sorted(times["pursamere_default"])[1]
    print(f"{k}: median {s[1]:.3f} s min {s[0]:.3f} s  rounds {[round(t, 3) for t in v]}  "
          f"ratio-to-default(median) {ratio:.2f}")
