"""Throughput of purify() per backend, beside the bare-network bound (SPEC section 4).

Config: ConvScoreNet (4 conv layers, 32 channels) at 28x28x1 and 32x32x3, B=16, N=8, K=20,
SAM on. Each run records images/s and efficiency = t_network / t_purify, where t_network is
the median time of the same number of bare score forward + input-backward passes on the same
B*N batch, timed in alternation with purify in the same process (so both see the same
machine load).
"""

import statistics
import time

import pytest
import torch
from conftest import TINY, sync

from pursamere_fast import PurifyConfig, purify
from pursamere_fast.nets import ConvScoreNet

SHAPES = [(1, 28, 28), (3, 32, 32)]
BATCH, N_SAMPLES, STEPS = (2, 2, 2) if TINY else (16, 8, 20)
# 3 rounds on the CPU keep `pytest bench/ --benchmark-only` near 10 minutes on 2 cores.
ROUNDS = 1 if TINY else (5 if torch.cuda.is_available() else 3)


def bench_config():
    return PurifyConfig(sigmas=(0.1,), steps_per_sigma=STEPS, n_samples=N_SAMPLES, sam_radius=4 / 255)


def setup(shape, device):
    torch.manual_seed(0)
    width = 4 if TINY else 32
    score = ConvScoreNet(shape[0], width=width, depth=4).to(device)
    x = torch.rand((BATCH, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    return score, x


def network_pass_count(cfg):
    return cfg.num_steps * (2 if cfg.sam_radius > 0 else 1)


def network_runner(score, x, cfg):
    """The bare network work of one purify: the same number of forward + input-backward
    passes on the same B*N batch."""
    y = x.repeat_interleave(cfg.n_samples, 0)
    sigma = torch.full((y.shape[0],), cfg.sigmas[0], device=x.device)
    upstream = torch.randn_like(y)

    def run():
        for _ in range(network_pass_count(cfg)):
            yl = y.detach().requires_grad_(True)
            torch.autograd.grad(score(yl, sigma), yl, upstream)
        sync(x.device)

    return run


def interleaved(benchmark, timed, other):
    """Benchmark `timed` with `other` run and timed before every round (pytest-benchmark's
    untimed setup), so that both see the same machine state; returns other's times."""
    times = []

    def setup():
        t0 = time.perf_counter()
        other()
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    return times


def purify_runner(score, x, cfg, backend):
    def run():
        purify(x, score, cfg, backend=backend)
        sync(x.device)

    return run


def backends(device):
    names = ["reference", "torch"]
    if device.type == "cuda":
        names.append("triton")
    return names


def median_or_nan(benchmark):
    return benchmark.stats.stats.median if benchmark.stats else float("nan")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_purify_throughput(benchmark, bench_device, backend, shape):
    """purify per backend; efficiency against the bare network timed in alternation with it."""
    if backend not in backends(bench_device) and not TINY:
        pytest.skip("triton is benchmarked on CUDA only: the CPU interpreter is not a performance path")
    cfg = bench_config()
    score, x = setup(shape, bench_device)
    t_net = statistics.median(interleaved(benchmark, purify_runner(score, x, cfg, backend),
                                          network_runner(score, x, cfg)))
    t_pur = median_or_nan(benchmark)
    benchmark.extra_info.update(
        device=str(bench_device), backend=backend, shape=list(shape), batch=BATCH, n_samples=N_SAMPLES,
        steps=cfg.num_steps, sam=True, threads=torch.get_num_threads(), images_per_s=BATCH / t_pur,
        t_network_s=t_net, efficiency=t_net / t_pur, network_passes=network_pass_count(cfg),
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_vs_reference(benchmark, bench_device, shape):
    """The fused loop timed in alternation with the reference: speedup = t_reference / t_fused."""
    cfg = bench_config()
    score, x = setup(shape, bench_device)
    fused = "triton" if "triton" in backends(bench_device) else "torch"
    t_ref = statistics.median(interleaved(benchmark, purify_runner(score, x, cfg, fused),
                                          purify_runner(score, x, cfg, "reference")))
    benchmark.extra_info.update(device=str(bench_device), backend=fused, shape=list(shape),
                                threads=torch.get_num_threads(), t_reference_s=t_ref,
                                speedup_vs_reference=t_ref / median_or_nan(benchmark))
