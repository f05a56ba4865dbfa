"""DiffPurePurifier (SPEC 12): throughput against reference/diffpure.py and the bare network, and
the memory of grad_mode="full" against the step count.

    python -m pytest bench/bench_diffpure.py --benchmark-only

Configs: "shipped" is the Fashion-MNIST protocol score (`pursamere_fast.pretrained.fashion_mnist`)
at t* = 0.1, S = 100 (DiffPure's CIFAR-10 setting), batch 32; "small" is ConvScoreNet(1, 4, 2)
on 8x8 images, where the sampler's own ops are a visible part of the time. Each pair is timed
in alternation in the same process (the other side as pytest-benchmark's untimed setup), so
both see the same machine load; extra_info holds images/s and the ratios.

Memory (`test_full_memory_vs_steps`): the peak memory of one forward + input-gradient of
grad_mode="full" (checkpointed per step) and of plain autograd through the reference, each in
a fresh subprocess (`python bench/bench_diffpure.py --memory ...`): on CUDA
torch.cuda.max_memory_allocated over the allocation before the call; on the CPU the rise of
the peak RSS (VmHWM, reset through /proc/self/clear_refs after a warm-up and malloc_trim) over
the RSS before the call, with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_)
so that every tensor above it is mapped and unmapped and the RSS follows the live tensors
(without it, ru_maxrss hid the whole run in heap memory freed while loading the model: "+0 MiB").
Beside it, the bytes autograd saved for the backward (saved_tensors_hooks). Run at two step
counts: the checkpointed figures stay flat (one state image per step), the plain ones grow
with S.
"""

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, synced
from pursamere_fast.reference import diffpure_reference

from pursamere_fast.nets import ConvScoreNet
from pursamere_fast.purifiers import DiffPurePurifier

BATCH = 2 if TINY else 32
STEPS = 3 if TINY else 100
T_STAR = 0.1
ROUNDS = 1 if TINY else 3
# "full" memory: batch and the two step counts compared.
MEM_BATCH = 2 if TINY else 8
MEM_STEPS = (2, 4) if TINY else (10, 40)


def models(config, device, batch):
    """(score, images) of the config."""
    if config == "shipped" and not TINY:
        from pursamere_fast.pretrained import fashion_mnist

        d = fashion_mnist(device)
        return d.score, d.images[:batch]
    torch.manual_seed(0)
    score = ConvScoreNet(1, 4, 2).eval().requires_grad_(False).to(device)
    x = torch.rand((batch, 1, 8, 8), generator=torch.Generator().manual_seed(0)).to(device)
    return score, x


def interleaved(benchmark, timed, others):
    """Benchmark `timed`, with each of `others` run and timed before every round; returns
    their times (a list per other)."""
    times = [[] for _ in others]

    def setup():
        for op, t in zip(others, times, strict=True):
            t0 = time.perf_counter()
            op()
            t.append(time.perf_counter() - t0)

    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    return times


def median_or_nan(benchmark):
    return benchmark.stats.stats.median if benchmark.stats else float("nan")


@pytest.mark.parametrize("method", ["sde", "ode"])
@pytest.mark.parametrize("config", ["shipped", "small"])
def test_fast_vs_reference(benchmark, bench_device, config, method):
    """One purification of BATCH images: the purifier, the reference loop on the same noise,
    and the bare network (S score calls on a fixed input, the bound no sampler can beat)."""
    score, x = models(config, bench_device, BATCH)
    p = DiffPurePurifier(score, t_star=T_STAR, steps=STEPS, method=method)
    noise = p.make_noise(x.shape[1:]).to(bench_device)
    sigma = torch.full((BATCH,), p._plan[0].sigma, device=bench_device)

    def reference():
        with torch.no_grad():
            diffpure_reference(x, score, noise, t_star=T_STAR, steps=STEPS, method=method)

    def bare():
        with torch.no_grad():
            for _ in range(STEPS):
                score(x, sigma)

    ref, bare_times = interleaved(benchmark, synced(lambda: p(x, noise), bench_device),
                                  [synced(reference, bench_device), synced(bare, bench_device)])
    t_fast, t_ref, t_bare = median_or_nan(benchmark), statistics.median(ref), statistics.median(bare_times)
    # Minima beside the medians: on a shared CPU the least disturbed round is the better estimate.
    fast_min = benchmark.stats.stats.min if benchmark.stats else float("nan")
    benchmark.extra_info.update(device=str(bench_device), config=config, method=method, batch=BATCH, steps=STEPS,
                                t_star=T_STAR, threads=torch.get_num_threads(), images_per_s=BATCH / t_fast,
                                s_per_image=t_fast / BATCH, s_per_image_min=fast_min / BATCH, t_reference_s=t_ref,
                                t_reference_min_s=min(ref), speedup_vs_reference=t_ref / t_fast,
                                t_bare_network_s=t_bare, t_bare_network_min_s=min(bare_times),
                                efficiency_vs_bare=t_bare / t_fast)


def peak_memory(config, mode, steps, batch, device):
    """Peak memory (bytes) of one forward + input-gradient, measured in a fresh subprocess."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory", config, mode, str(steps), str(batch),
           str(device)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_child(config, mode, steps, batch, device):
    """The body of the subprocess: prints {"peak_bytes": ..., "saved_bytes": ...}."""
    device = torch.device(device)
    score, x = models(config, device, batch)

    def run(s, b):
        p = DiffPurePurifier(score, t_star=T_STAR, steps=s, grad_mode="full")
        xr = x[:b].clone().requires_grad_(True)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if mode == "full":
                out = p(xr)
            else:  # plain autograd through the reference loop: every step's activations kept
                out = diffpure_reference(xr, score, p.make_noise(x.shape[1:]).to(device), t_star=T_STAR, steps=s)
        torch.autograd.grad(out.sum(), xr)
        return sum(saved)

    run(1, 1)  # warm-up: allocator pools, torch.utils.checkpoint's first call
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        saved = run(steps, batch)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back: the RSS is the live memory
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
        base = _status_kib("VmRSS")
        saved = run(steps, batch)
        peak = (_status_kib("VmHWM") - base) * 1024
    print(json.dumps({"peak_bytes": peak, "saved_bytes": saved}))


def _status_kib(field):
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@pytest.mark.parametrize("steps", MEM_STEPS)
def test_full_memory_vs_steps(benchmark, bench_device, steps):
    """grad_mode="full": time of forward + input-gradient, and in extra_info the peak memory of
    the checkpointed purifier and of plain autograd through the reference at this step count."""
    config = "shipped"
    score, x = models(config, bench_device, MEM_BATCH)
    p = DiffPurePurifier(score, t_star=T_STAR, steps=steps, grad_mode="full")

    def forward_backward():
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(p(xr).sum(), xr)

    benchmark.pedantic(synced(forward_backward, bench_device), rounds=ROUNDS, warmup_rounds=1)
    mib = 2.0**20
    full = peak_memory(config, "full", steps, MEM_BATCH, bench_device)
    plain = peak_memory(config, "plain", steps, MEM_BATCH, bench_device)
    benchmark.extra_info.update(device=str(bench_device), config=config if not TINY else "small", batch=MEM_BATCH,
                                steps=steps, t_star=T_STAR, threads=torch.get_num_threads(),
                                peak_full_mib=full["peak_bytes"] / mib,
                                peak_plain_autograd_mib=plain["peak_bytes"] / mib,
                                saved_full_mib=full["saved_bytes"] / mib,
                                saved_plain_autograd_mib=plain["saved_bytes"] / mib,
                                s_per_image=median_or_nan(benchmark) / MEM_BATCH)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--memory":
        _memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        sys.exit("usage: bench_diffpure.py --memory CONFIG full|plain STEPS BATCH DEVICE")
