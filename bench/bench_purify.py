"""Throughput of purify() per backend, beside the bare-network bound (SPEC section 4).

Config (issue 2): ConvScoreNet (4 conv layers, 32 channels) at 28x28x1 and 32x32x3,
B=16, N=8, K=20, SAM on. Each run records images/s and
efficiency = t_network / t_purify, where t_network is the median time of the same number of
bare score forward + input-backward passes on the same B*N batch, in the same process.
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
ROUNDS = 1 if TINY else 5


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


def time_network(score, x, cfg, reps):
    """Median seconds of the bare network work of one purify: forward + input-backward passes."""
    y = x.repeat_interleave(cfg.n_samples, 0)
    sigma = torch.full((y.shape[0],), cfg.sigmas[0], device=x.device)
    upstream = torch.randn_like(y)

    def run():
        for _ in range(network_pass_count(cfg)):
            yl = y.detach().requires_grad_(True)
            torch.autograd.grad(score(yl, sigma), yl, upstream)
        sync(x.device)

    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def backends(device):
    names = ["reference", "torch"]
    if device.type == "cuda":
        names.append("triton")
    return names


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_purify_throughput(benchmark, bench_device, backend, shape):
    if backend not in backends(bench_device) and not TINY:
        pytest.skip("triton is benchmarked on CUDA only: the CPU interpreter is not a performance path")
    cfg = bench_config()
    score, x = setup(shape, bench_device)

    def run():
        out = purify(x, score, cfg, backend=backend)
        sync(bench_device)
        return out

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    t_net = time_network(score, x, cfg, reps=ROUNDS)
    t_pur = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(
        device=str(bench_device), backend=backend, shape=list(shape), batch=BATCH, n_samples=N_SAMPLES,
        steps=cfg.num_steps, sam=True, images_per_s=BATCH / t_pur, t_network_s=t_net,
        efficiency=t_net / t_pur, network_passes=network_pass_count(cfg),
    )
