"""NCSNv2 CIFAR-10 throughput of purify() per execution variant, beside the bare network run the
same way (SPEC section 4).

Config (GPU issue, item 3): the NCSNv2 CIFAR-10 architecture (ngf 128, random weights,
29.7 M parameters), 3x32x32 inputs, B in {1, 16, 64}, N = 8, K = 100 (25 sigmas x 4 steps),
SAM on, so 2K = 200 score forward + input-backward passes on a B*N batch per purification.

Variants (`VARIANTS`): reference, torch, triton (eager), triton+graphs (CUDA graph of one step
replayed K times), triton+graphs/loop (the whole loop in one graph), triton+bf16 (eager, bf16
autocast), triton+graphs+bf16, +channels_last, +compile (torch.compile of the score).

Figures per (variant, B), all from the same process:
- images/s = B / t_purify (median over rounds; the first call, which captures or compiles, is
  reported apart as t_first_call_s);
- efficiency = t_network / t_purify, t_network the time of the same 2K bare passes (forward +
  input-backward on the same B*N batch) run the same way: through the same
  `graphs.prepare_score` wrapper (precision, layout, compilation) and, for graph variants,
  as a captured graph of one pass. Timed over `Size.network_passes` passes (median of
  `network_reps`) and scaled to 2K (recorded as network_passes_timed);
- achieved TFLOP/s from the FLOP count of one forward + input-backward per image-sample
  (FlopCounterMode on the meta device: 39.57 GFLOP at ngf 128, the SPEC's 19.8 + 19.8), and
  MFU against the device's dense datasheet peak for the precision the convolutions run in
  (bf16 under autocast; TF32 for fp32 when cuDNN allows TF32, which is PyTorch's default).

`bench/record.py` runs these at full size on a GPU and writes bench/results/<gpu>.json.
PURSAMERE_BENCH_SIZE=tiny (tests/test_bench_smoke.py): ngf 8, 8x8, B = 1, N = 2, K = 2, on the CPU;
the full size is skipped on the CPU (it is a GPU benchmark: ~8 PFLOP per call at B = 64).
"""

from __future__ import annotations

import functools
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# conftest first: it sets TRITON_INTERPRET on CPU-only machines, which must happen before
# anything imports triton (torch.utils.flop_counter does), also when record.py imports us.
from conftest import TINY, sync  # isort: skip

import pytest
import torch
from pursamere_fast.kernels import use_triton
from torch.utils.flop_counter import FlopCounterMode

from pursamere_fast import PurifyConfig, geometric_sigmas, graphs, purify
from pursamere_fast.scores.ncsnv2 import NCSNv2, NCSNv2Score

CHANNELS = 3
# The SPEC's cost model at ngf 128 (section 4): GFLOP per image-sample.
SPEC_GFLOP_FWD, SPEC_GFLOP_BWD = 19.8, 19.8


@dataclass(frozen=True)
class Size:
    ngf: int
    image_size: int
    n_samples: int
    num_sigmas: int
    steps_per_sigma: int
    batches: tuple[int, ...]
    rounds: dict = field(default_factory=dict)
    # Bare-network passes per timing (median of network_reps): enough to average out launch
    # jitter, far fewer than 2K = 200 so that the bound does not double the device time.
    network_passes: int = 10
    network_reps: int = 3

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (CHANNELS, self.image_size, self.image_size)

    def config(self) -> PurifyConfig:
        return PurifyConfig(sigmas=geometric_sigmas(0.25, 0.02, self.num_sigmas), steps_per_sigma=self.steps_per_sigma,
                            n_samples=self.n_samples, sam_radius=4 / 255, max_batch=max(self.batches))


# Rounds: a B=64 call runs ~10^4 kernels for tens of seconds, so one timed call is already an
# average; the device budget (30 min a session) pays for more only where calls are short.
FULL = Size(ngf=128, image_size=32, n_samples=8, num_sigmas=25, steps_per_sigma=4, batches=(1, 16, 64),
            rounds={1: 5, 16: 3, 64: 1})
SMALL = Size(ngf=8, image_size=8, n_samples=2, num_sigmas=1, steps_per_sigma=2, batches=(1,), rounds={1: 1},
             network_passes=2, network_reps=1)


@dataclass(frozen=True)
class Variant:
    name: str
    backend: str
    cuda_graph: bool = False
    score_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile_score: bool = False
    capture_mode: str = "step"

    def kwargs(self) -> dict:
        if self.backend == "reference":
            return dict(backend="reference")
        return dict(backend=self.backend, cuda_graph=self.cuda_graph, score_dtype=self.score_dtype,
                    channels_last=self.channels_last, compile_score=self.compile_score)

    @property
    def options(self) -> graphs.ScoreOptions:
        return graphs.ScoreOptions(self.score_dtype, self.channels_last, self.compile_score)

    def unavailable(self, device: torch.device, tiny: bool) -> str | None:
        """Why this variant cannot run here (None when it can)."""
        if device.type != "cuda":
            if not tiny:
                return "full size (NCSNv2 ngf 128, B*N up to 512, K = 100) is a GPU benchmark"
            if self.cuda_graph:
                return "CUDA graphs need a CUDA device"
            if self.compile_score:
                return "torch.compile is benchmarked on CUDA only (Inductor's CPU build of NCSNv2 takes minutes)"
        if self.backend == "triton" and not use_triton(device):
            return "triton cannot run here (not installed, or no CUDA and TRITON_INTERPRET unset)"
        return None


BF16 = torch.bfloat16
VARIANTS = {
    v.name: v
    for v in (
        Variant("reference", "reference"),
        Variant("torch", "torch"),
        Variant("triton", "triton"),
        Variant("triton+graphs", "triton", cuda_graph=True),
        Variant("triton+graphs+bf16", "triton", cuda_graph=True, score_dtype=BF16),
        Variant("triton+graphs/loop", "triton", cuda_graph=True, capture_mode="loop"),
        Variant("triton+bf16", "triton", score_dtype=BF16),
        Variant("triton+graphs+bf16+cl", "triton", cuda_graph=True, score_dtype=BF16, channels_last=True),
        Variant("triton+graphs+bf16+cl+compile", "triton", cuda_graph=True, score_dtype=BF16, channels_last=True,
                compile_score=True),
    )
}
CORE = ("reference", "torch", "triton", "triton+graphs", "triton+graphs+bf16")

# Dense (no sparsity) datasheet peaks in TFLOP/s, by precision. Matched on
# torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS = (
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak of the named device at `precision` ("bf16", "tf32", "fp32"); None if unknown."""
    for key, peaks in PEAK_TFLOPS:
        if key in device_name:
            return peaks[precision]
    return None


def precision_of(variant: Variant, device: torch.device) -> str:
    """The precision the score's convolutions run in."""
    if variant.score_dtype == BF16:
        return "bf16"
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "fp32"


@functools.cache
def flops_per_image_sample(ngf: int, image_size: int = 32) -> tuple[int, int]:
    """(forward, input-backward) FLOPs of the NCSNv2 score on one 3 x image_size^2 image-sample.

    Counted by FlopCounterMode on the meta device: exact for the convolutions and matmuls,
    which are the whole count, and needs no memory or time.
    """
    with torch.device("meta"):
        score = NCSNv2Score(NCSNv2(image_size, CHANNELS, ngf))
        y = torch.empty(1, CHANNELS, image_size, image_size, requires_grad=True)
        sigma = torch.ones(1)
    with FlopCounterMode(display=False) as fwd:
        s = score(y, sigma)
    with FlopCounterMode(display=False) as bwd:
        torch.autograd.grad(s, y, torch.ones_like(s))
    return fwd.get_total_flops(), bwd.get_total_flops()


def make_score(size: Size, device: torch.device) -> NCSNv2Score:
    """A fresh NCSNv2 with seeded random weights (fresh per variant: channels_last converts in place)."""
    torch.manual_seed(0)
    return NCSNv2Score(NCSNv2(size.image_size, CHANNELS, size.ngf)).to(device).eval()


def make_images(batch: int, size: Size, device: torch.device) -> torch.Tensor:
    return torch.rand((batch, *size.image_shape), generator=torch.Generator().manual_seed(0)).to(device)


def median_time(run, rounds: int, device: torch.device) -> float:
    """Median wall time of `rounds` calls of run(), synchronizing the device inside the timing."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def network_inputs(x: torch.Tensor, cfg: PurifyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The bare network's (y, sigma) on the B*N batch, laid out as the loop's: y contiguous and
    sigma one value expanded over the rows (stride 0), as `purify._FusedLoop` passes it. A
    contiguous sigma would make torch.compile(dynamic=False) guard-fail and compile NCSNv2 a
    second time inside the measurement."""
    base = x.repeat_interleave(cfg.n_samples, 0)
    y = base + 0.1 * torch.randn_like(base)
    return y, torch.full((), 0.1, device=x.device, dtype=x.dtype).expand(y.shape[0])


def time_network_pass(score, variant: Variant, x: torch.Tensor, cfg: PurifyConfig, passes: int, reps: int) -> float:
    """Median seconds of one bare forward + input-backward pass on the B*N batch, run the way
    `variant` runs the loop's score: same prepared wrapper, a captured graph for graph variants."""
    device = x.device
    fn = graphs.prepare_score(score, variant.options)
    y, sigma = network_inputs(x, cfg)
    upstream = torch.randn_like(y)

    def one_pass():
        yl = y.detach().requires_grad_(True)
        # .float() as the loop's s.to(dtype): under bf16 the cast back is part of the pass.
        torch.autograd.grad(fn(yl, sigma).float(), yl, upstream)

    run = one_pass
    if variant.cuda_graph:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(graphs.WARMUP_STEPS):
                one_pass()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            one_pass()
        run = graph.replay

    def many():
        for _ in range(passes):
            run()

    many()
    sync(device)
    return median_time(many, reps, device) / passes


def measure(variant: Variant, batch: int, size: Size, device: torch.device, rounds: int | None = None,
            timer=None, network_cache: dict | None = None) -> dict:
    """One (variant, batch) measurement: purify timing, the bare-network bound, derived figures.

    Args:
        variant: what to run.  batch: B.  size: FULL or SMALL.  device: where.
        rounds: timed purify calls (default size.rounds[batch]).
        timer: (run, rounds) -> median seconds (default `median_time`; the pytest benchmark
            passes pytest-benchmark's).
        network_cache: per-process dict reusing the bare-network time of variants that run the
            network the same way (the three eager fp32 variants).

    Returns:
        A JSON-ready dict of the figures.
    """
    rounds = rounds or size.rounds.get(batch, 1)
    cfg = size.config()
    graphs.clear_graph_cache()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    saved_mode = graphs.CAPTURE_MODE
    graphs.CAPTURE_MODE = variant.capture_mode
    try:
        score, x = make_score(size, device), make_images(batch, size, device)

        def run():
            return purify(x, score, cfg, **variant.kwargs())

        # First call: captures the graph / compiles; eager variants warm up on a 2-step config.
        t0 = time.perf_counter()
        if variant.cuda_graph or variant.compile_score:
            run()
        else:
            purify(x, score, cfg.with_overrides(sigmas=cfg.sigmas[:1], steps_per_sigma=min(2, cfg.num_steps)),
                   **variant.kwargs())
        sync(device)
        t_first = time.perf_counter() - t0
        t_purify = (timer or (lambda fn, n: median_time(fn, n, device)))(run, rounds)
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        # The loop's graph pool goes before the network's graph takes its own (compilations stay).
        graphs.clear_graph_cache(scores=False)
        way = (variant.cuda_graph, variant.options, batch)
        if network_cache is not None and way in network_cache:
            t_pass = network_cache[way]
        else:
            t_pass = time_network_pass(score, variant, x, cfg, size.network_passes, size.network_reps)
            if network_cache is not None:
                network_cache[way] = t_pass
    finally:
        graphs.CAPTURE_MODE = saved_mode
        graphs.clear_graph_cache()
    passes = cfg.num_steps * (2 if cfg.sam_radius > 0 else 1)
    fwd, bwd = flops_per_image_sample(size.ngf, size.image_size)
    flop = batch * cfg.n_samples * passes * (fwd + bwd)
    precision = precision_of(variant, device)
    peak = peak_tflops(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None
    tflops = flop / t_purify / 1e12
    return dict(
        variant=variant.name, backend=variant.backend, cuda_graph=variant.cuda_graph,
        capture_mode=variant.capture_mode if variant.cuda_graph else None,
        score_dtype=str(variant.score_dtype).replace("torch.", "") if variant.score_dtype else None,
        channels_last=variant.channels_last, compile_score=variant.compile_score,
        batch=batch, n_samples=cfg.n_samples, steps=cfg.num_steps, sam=cfg.sam_radius > 0, ngf=size.ngf,
        image_size=size.image_size,
        rounds=rounds, t_first_call_s=t_first, t_purify_s=t_purify, images_per_s=batch / t_purify,
        network_passes=passes, network_passes_timed=size.network_passes, t_network_s=t_pass * passes,
        efficiency=t_pass * passes / t_purify, flop_per_purify=flop, tflops=tflops, precision=precision,
        peak_tflops=peak, mfu=tflops / peak if peak else None, peak_memory_gib=peak_mem,
    )


SIZE = SMALL if TINY else FULL


def test_flop_count_matches_spec():
    fwd, bwd = flops_per_image_sample(128)
    assert abs(fwd / 1e9 - SPEC_GFLOP_FWD) <= 0.05 * SPEC_GFLOP_FWD, fwd
    assert abs(bwd / 1e9 - SPEC_GFLOP_BWD) <= 0.05 * SPEC_GFLOP_BWD, bwd


def test_network_pass_lays_out_its_inputs_as_the_loop_does():
    # Same shapes, strides and dtypes as the loop's score calls: a compiled score then serves
    # both without a second compilation.
    cfg = SMALL.config().with_overrides(max_batch=2)
    x = make_images(2, SMALL, torch.device("cpu"))
    seen = []

    def score(y, sigma):
        seen.append((y.shape, y.stride(), y.dtype, sigma.shape, sigma.stride(), sigma.dtype))
        return -y / sigma.view(-1, 1, 1, 1)

    purify(x, score, cfg, backend="torch", cuda_graph=False)
    y, sigma = network_inputs(x, cfg)
    score(y.requires_grad_(True), sigma)
    assert len(set(seen)) == 1, seen


def test_peak_table_prefers_the_specific_name():
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert peak_tflops("NVIDIA H200 NVL", "bf16") == 835.5
    assert peak_tflops("Some Future GPU", "bf16") is None


@pytest.mark.parametrize("batch", SIZE.batches)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_ncsnv2_throughput(benchmark, bench_device, name, batch):
    variant = VARIANTS[name]
    reason = variant.unavailable(bench_device, TINY)
    if reason:
        pytest.skip(reason)

    def timer(run, rounds):
        benchmark.pedantic(lambda: (run(), sync(bench_device)), rounds=rounds)
        return benchmark.stats.stats.median if benchmark.stats else float("nan")

    row = measure(variant, batch, SIZE, bench_device, timer=timer)
    benchmark.extra_info.update(device=str(bench_device), **row)
    assert row["network_passes"] == SIZE.config().num_steps * 2 and row["t_network_s"] > 0


def test_record_writes_and_merges_json(tmp_path, bench_device):
    # record.py imports this module: it runs as a script here rather than being imported back,
    # so that the two modules form no import cycle.
    def record(*args) -> Path:
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("record.py")), *args],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return Path(re.findall(r"^wrote (.+)$", proc.stdout, re.M)[-1])

    common = ["--size", "tiny", "--device", str(bench_device), "--out-dir", str(tmp_path)]
    first = record(*common, "--variants", "torch,triton+graphs", "--tag", "a")
    second = record(*common, "--variants", "reference", "--tag", "b")
    merged_path = record("--merge", str(first), str(second), "--out", str(tmp_path / "m.json"))
    merged = json.loads(merged_path.read_text())
    ran = {r["variant"] for r in merged["results"]}
    assert {"torch", "reference"} <= ran
    assert ("triton+graphs" in ran) == (bench_device.type == "cuda")
    assert all(r["t_purify_s"] > 0 and r["efficiency"] > 0 for r in merged["results"])
    assert merged["versions"]["torch"] == torch.__version__ and merged["flops"]["forward_per_image_sample"] > 0
