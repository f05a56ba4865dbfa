"""purify's score options on the CPU, on the shipped Fashion-MNIST config (K = 10, N = 2, SAM off).

Each option is timed in alternation with the pre-issue-11 default (eager fp32, chunks of
max_batch = 64 images = 128 rows, contiguous layout), so both see the same machine load:
speedup = t_baseline / t_option. extra_info also carries the largest pixel difference from
the baseline's output, and the achieved GFLOP/s of the score network (FLOPs of one
forward + input-backward per row, counted by FlopCounterMode, times the rows purify runs).
"""

import copy
import statistics

import pytest
import torch
from bench_purify import interleaved, median_or_nan
from conftest import TINY, sync
from torch.utils.flop_counter import FlopCounterMode

import pursamere_fast.graphs as graphs
from pursamere_fast import purify
from pursamere_fast.pretrained import fashion_mnist

BATCH = 4 if TINY else 64
ROUNDS = 1 if TINY else 3
BASELINE = dict(channels_last=False, chunk_rows=None)
# bf16 autocast runs 20x slower than fp32 on a CPU without native bf16 (AVX2), so it gets a
# quarter of the batch to keep the whole benchmark near five minutes on 2 cores.
VARIANTS = {
    "default": ({}, BATCH),
    "channels_last": (dict(channels_last=True), BATCH),
    "compile": (dict(compile_score=True), BATCH),
    "bf16": (dict(score_dtype=torch.bfloat16), max(1, BATCH // 4)),
}


def flops_per_row(score, image_shape) -> int:
    """FLOPs of one score forward + input-gradient backward on one row (frozen weights, so the
    backward computes what purify's does: the input gradient only)."""
    frozen = copy.deepcopy(score).requires_grad_(False)
    y = torch.rand(1, *image_shape).requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        frozen(y, torch.full((1,), 0.1)).sum().backward()
    return counter.get_total_flops()


def runner(score, config, x, options):
    def run():
        purify(x, score, config, backend="torch", **options)
        sync(x.device)

    return run


@pytest.mark.parametrize("name", list(VARIANTS))
def test_score_option_speedup(benchmark, name, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU options; bench_ncsnv2.py times the GPU ones")
    if TINY:  # the smoke test checks the plumbing; Inductor's C++ compile would take 15-45 s
        monkeypatch.setattr(graphs, "COMPILE_OPTIONS", {"backend": "aot_eager", "dynamic": False})
    # v1: the ConvScoreNet bench/results/ measured. Its own copy of the score: channels_last
    # converts a module's weights in place, which would change the baseline's layout too.
    d = fashion_mnist(release="v1")
    base_score = fashion_mnist(release="v1").score
    options, batch = VARIANTS[name]
    x = d.images[:batch]
    base_out = purify(x, base_score, d.config, backend="torch", **BASELINE)
    out = purify(x, d.score, d.config, backend="torch", **options)  # first call: compilation, if any
    t_base = statistics.median(interleaved(benchmark, runner(d.score, d.config, x, options),
                                           runner(base_score, d.config, x, BASELINE)))
    t = median_or_nan(benchmark)
    cfg = d.config
    flops = flops_per_row(d.score, x.shape[1:]) * batch * cfg.n_samples * cfg.num_steps * (2 if cfg.sam_radius else 1)
    benchmark.extra_info.update(
        option=name, options={k: str(v) for k, v in options.items()}, batch=batch, threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(), ms_per_image=1e3 * t / batch,
        baseline_ms_per_image=1e3 * t_base / batch, speedup=t_base / t, gflops=flops / t / 1e9,
        max_pixel_diff=(out - base_out).abs().max().item(), mean_pixel_diff=(out - base_out).abs().mean().item(),
    )
