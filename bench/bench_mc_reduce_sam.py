"""Micro-benchmark of mc_reduce_sam: reference, torch fallback and Triton launcher.

    python -m pytest bench/bench_mc_reduce_sam.py --benchmark-only

Modes: "sum" (g only, the call after the SAM pass), "linf" and "l2" (g plus the SAM batch).
GB/s counts the compulsory traffic: gy read and g written; with the SAM batch also x and
eps read and y written. The Triton launcher is timed only on CUDA (the interpreter is not a
performance path). `run` is importable so that smoke tests can call it at tiny sizes.
"""

import os

import pytest
import torch
from conftest import synced
from pursamere_fast.kernels import mc_reduce_sam, mc_reduce_sam_torch, use_triton
from pursamere_fast.reference.mc_reduce_sam import mc_reduce_sam as mc_reduce_sam_ref

IMPLS = ("reference", "torch", "triton")
MODES = ("sum", "linf", "l2")
# (B, N, D); PURSAMERE_BENCH_SIZE=tiny (the suite's smoke run) shrinks them.
SIZES = {"fmnist": (16, 8, 784), "cifar10": (16, 8, 3 * 32 * 32)}
if os.environ.get("PURSAMERE_BENCH_SIZE") == "tiny":
    SIZES = {"tiny": (2, 3, 7)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bytes_moved(b, n, d, itemsize, mode):
    """Compulsory bytes of one call: gy [B, N, D] read, g [B, D] written; with the SAM batch
    also x [B, D] and eps [N, D] read and y [B, N, D] written."""
    nbytes = b * n * d + b * d
    if mode != "sum":
        nbytes += b * d + n * d + b * n * d
    return itemsize * nbytes


def make_call(impl, mode, b, n, d, device, dtype=torch.float32):
    """A zero-argument function doing one call of `impl` on fresh inputs (synchronizing on CUDA)."""
    gen = torch.Generator().manual_seed(0)
    gy = torch.randn(b, n, d, generator=gen, dtype=dtype).to(device)
    x = torch.rand(b, d, generator=gen, dtype=dtype).to(device)
    eps = torch.randn(n, d, generator=gen, dtype=dtype).to(device)
    sig_t = torch.tensor([0.5, 0.3], dtype=dtype, device=device)
    norm = "l2" if mode == "l2" else "linf"
    radius = 0.0 if mode == "sum" else (0.5 if mode == "l2" else 4 / 255)
    g = torch.empty_like(x)
    y = None if mode == "sum" else torch.empty_like(gy)
    if impl == "reference":
        def op():
            mc_reduce_sam_ref(gy, x, eps, sig_t[1], radius, norm)
    else:
        fn = mc_reduce_sam if impl == "triton" else mc_reduce_sam_torch

        def op():
            fn(gy, x, eps, sig_t[1], radius, norm, g, y)
    return synced(op, device)


def run(benchmark, impl, mode, device, b, n, d, dtype=torch.float32):
    """Benchmark one configuration and put GB/s in benchmark.extra_info."""
    device = torch.device(device)
    if impl == "triton" and not (device.type == "cuda" and use_triton(device)):
        pytest.skip("Triton is timed on CUDA only: the interpreter is not a performance path")
    call = make_call(impl, mode, b, n, d, device, dtype)
    call()  # compile / warm up outside the timing
    benchmark(call)
    nbytes = bytes_moved(b, n, d, torch.finfo(dtype).bits // 8, mode)
    benchmark.extra_info.update(impl=impl, mode=mode, device=str(device), B=b, N=n, D=d, bytes=nbytes)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_mc_reduce_sam(benchmark, impl, mode, device, size):
    run(benchmark, impl, mode, device, *SIZES[size])
