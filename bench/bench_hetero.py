"""HeteroPurifier (SPEC 8): the fast sampler against reference/hetero.py, and purify_runs(R)
against R separate runs.

    python -m pytest bench/bench_hetero.py --benchmark-only

Config: the shipped Fashion-MNIST score and classifier, batch 32, t_l = 200, t_s = 100, U = 3,
S = 100 (20 network calls per run), R = 5; and a "small" config (ConvScoreNet(1, 4, 2),
8x8 images) where the sampler's own ops, not the network, are most of the time. Each pair is
timed in alternation in the same process (the other one as pytest-benchmark's untimed setup),
so both see the same machine load; extra_info holds images/s and the speedup.
"""

import statistics
import time

import pytest
import torch
from conftest import TINY, synced
from pursamere_fast.reference import hetero_reference

from pursamere_fast.nets import ConvScoreNet, SmallCNN
from pursamere_fast.purifiers import HeteroPurifier

BATCH, RUNS = (2, 2) if TINY else (32, 5)
SETTINGS = dict(t_l=40, t_s=20, resample_steps=3, grid_steps=100) if TINY else \
    dict(t_l=200, t_s=100, resample_steps=3, grid_steps=100)
ROUNDS = 1 if TINY else 3


def models(config, device):
    """(score, classifier, images) of the config."""
    if config == "shipped" and not TINY:
        from pursamere_fast.pretrained import fashion_mnist

        d = fashion_mnist(device, release="v1")  # the models docs/hetero.md measured
        return d.score, d.classifier, d.images[:BATCH]
    torch.manual_seed(0)
    score = ConvScoreNet(1, 4, 2).eval().requires_grad_(False).to(device)
    classifier = SmallCNN(1, 10, 4, 8).eval().requires_grad_(False).to(device)
    x = torch.rand((BATCH, 1, 8, 8), generator=torch.Generator().manual_seed(0)).to(device)
    return score, classifier, x


def interleaved(benchmark, timed, other):
    """Benchmark `timed` with `other` run and timed before every round; returns other's median."""
    times = []

    def setup():
        t0 = time.perf_counter()
        other()
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    return statistics.median(times)


def median_or_nan(benchmark):
    return benchmark.stats.stats.median if benchmark.stats else float("nan")


@pytest.mark.parametrize("config", ["shipped", "small"])
def test_fast_vs_reference(benchmark, bench_device, config):
    """One run of the purifier against the reference loop on the same noise and mask."""
    score, classifier, x = models(config, bench_device)
    p = HeteroPurifier(score, classifier, **SETTINGS)
    noise, mask = p.make_noise(x.shape[1:]), p.mask(x)
    noise = type(noise)(*(n.to(bench_device) for n in noise))

    def reference():
        with torch.no_grad():
            hetero_reference(x, p.noise_predictor, mask, noise, t_l=p.t_l, t_s=p.t_s, stride=p.stride,
                             resample_steps=p.resample_steps)

    t_ref = interleaved(benchmark, synced(lambda: p(x, noise, mask), bench_device), synced(reference, bench_device))
    t_fast = median_or_nan(benchmark)
    benchmark.extra_info.update(device=str(bench_device), config=config, batch=BATCH, **SETTINGS,
                                network_calls=len(p._plan), threads=torch.get_num_threads(),
                                images_per_s=BATCH / t_fast, t_reference_s=t_ref, speedup_vs_reference=t_ref / t_fast)


@pytest.mark.parametrize("config", ["shipped", "small"])
def test_purify_runs_vs_separate_runs(benchmark, bench_device, config):
    """purify_runs(x, R): one pass of R * B rows, against R purifiers with seeds 0..R-1."""
    score, classifier, x = models(config, bench_device)
    purifiers = [HeteroPurifier(score, classifier, seed=r, **SETTINGS) for r in range(RUNS)]

    def separate():
        for p in purifiers:
            p(x)

    t_sep = interleaved(benchmark, synced(lambda: purifiers[0].purify_runs(x, RUNS), bench_device),
                        synced(separate, bench_device))
    t_runs = median_or_nan(benchmark)
    benchmark.extra_info.update(device=str(bench_device), config=config, batch=BATCH, runs=RUNS, **SETTINGS,
                                threads=torch.get_num_threads(), images_per_s=BATCH * RUNS / t_runs,
                                t_separate_s=t_sep, speedup_vs_separate=t_sep / t_runs)
