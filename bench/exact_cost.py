"""CPU cost of the exact-gradient purification (`pursamere_fast.exact.purify_unrolled`): one
forward and one input-gradient backward at a small fixed config.

    OMP_NUM_THREADS=1 python bench/exact_cost.py [--norm linf|l2] [--reps 5] [--exact-file PATH]
        [--save-grad FILE]

Config: ConvScoreNet(1, 32, 4) with seeded random weights, 8 images 28x28 in float32, N = 4,
K = 4 (2 sigmas x 2 steps), SAM on (r = 2/255), rho = 8/255; torch threads as the environment
sets them (OMP_NUM_THREADS). Prints the FLOPs of one call (FlopCounterMode: the convolutions,
double backward included; independent of the machine's load), the median and each of `reps`
timed calls after that first one, and the median process CPU time (less sensitive than wall
time to other processes on a shared machine). `--exact-file` loads another version of
exact.py (e.g. from `git show`) in place of the installed one, so two versions can be timed
alternately on a shared machine;
`--save-grad` writes the input gradient, to check that two versions agree bit for bit.

    OMP_NUM_THREADS=1 python bench/exact_cost.py --saved-per-row

instead counts the distinct bytes of the tensors one checkpointed step's recomputation saves
for its backward (saved_tensors_hooks, unique storages), per score row, for NCSNv2 (ngf 128,
3x32x32, random weights) with linf and l2 SAM: what `exact.CUDA_CHUNK_PIXELS` is sized from.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pursamere_fast import PurifyConfig
from pursamere_fast.nets import ConvScoreNet


def load_exact(path: str | None):
    """The installed `pursamere_fast.exact`, or the module at `path` loaded in its place."""
    if path is None:
        from pursamere_fast import exact

        return exact
    spec = importlib.util.spec_from_file_location("pursamere_fast._exact_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def saved_mib_per_row(exact, norm: str, rows: int = 1) -> float:
    """MiB of distinct tensors saved by one step of `exact._step` with create_graph=True (the
    graph a checkpointed step's backward rebuilds), per score row, NCSNv2 ngf 128 at 32x32."""
    from pursamere_fast.scores.ncsnv2 import NCSNv2, NCSNv2Score

    torch.manual_seed(0)
    score = exact._input_only(NCSNv2Score(NCSNv2(32, 3, 128)).eval())
    config = PurifyConfig(sigmas=(0.5,), steps_per_sigma=1, n_samples=1, sam_radius=4 / 255, norm=norm,
                          rho=0.5 if norm == "l2" else 16 / 255)
    x = torch.rand(rows, 3, 32, 32).requires_grad_(True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        exact._step(x, torch.zeros_like(x), torch.zeros_like(x), x.detach().clone(), torch.randn(1, 3, 32, 32), 0,
                    0.5, 0.01, config, score, None, True)
    return sum(storages.values()) / 2**20 / rows


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--exact-file")
    parser.add_argument("--save-grad")
    parser.add_argument("--saved-per-row", action="store_true")
    args = parser.parse_args(argv)
    exact = load_exact(args.exact_file)
    if args.saved_per_row:
        for norm in ("linf", "l2"):
            print(f"{norm} SAM: {saved_mib_per_row(exact, norm):.0f} MiB saved per row (one step, NCSNv2 ngf 128)")
        return 0.0
    torch.manual_seed(0)
    score = ConvScoreNet(1, 32, 4).eval()
    config = PurifyConfig(sigmas=(0.3, 0.1), steps_per_sigma=2, n_samples=4, norm=args.norm, rho=8 / 255,
                          sam_radius=2 / 255, lr_max=0.01, lr_min=0.005)
    x = 0.2 + 0.6 * torch.rand((8, 1, 28, 28), generator=torch.Generator().manual_seed(1))
    w = torch.randn_like(x, memory_format=torch.contiguous_format)

    def run():
        xr = x.clone().requires_grad_(True)
        out = exact.purify_unrolled(xr, score, config, channels_last=False)
        (grad,) = torch.autograd.grad((out * w).sum(), xr)
        return grad

    with FlopCounterMode(display=False) as flops:
        grad = run()
    times, cpu = [], []
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    median = statistics.median(times)
    print(f"{args.norm} exact={args.exact_file or 'installed'} threads={torch.get_num_threads()}: "
          f"{flops.get_total_flops() / 1e9:.3f} GFLOP; wall median {median:.3f} s of {args.reps} "
          f"({', '.join(f'{t:.3f}' for t in times)}); process CPU median {statistics.median(cpu):.3f} s")
    if args.save_grad:
        torch.save(grad, args.save_grad)
    return median


if __name__ == "__main__":
    main()
