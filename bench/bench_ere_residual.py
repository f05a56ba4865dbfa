"""Micro-benchmark of ere_residual: reference, torch fallback and Triton launcher.

    python -m pytest bench/bench_ere_residual.py --benchmark-only

GB/s counts the compulsory traffic: read s and eps, write grad and sqnorm once each. The
Triton launcher is timed only on CUDA (the interpreter is not a performance path). `run` is
importable so that smoke tests can call it at tiny sizes.
"""

import os

import pytest
import torch
from conftest import synced
from pursamere_fast.kernels import ere_residual, ere_residual_torch, use_triton
from pursamere_fast.reference.ere_residual import ere_residual as ere_residual_ref

IMPLS = ("reference", "torch", "triton")
# (B, N, D); PURSAMERE_BENCH_SIZE=tiny (the suite's smoke run) shrinks them.
SIZES = {"fmnist": (16, 8, 784), "cifar10": (16, 8, 3 * 32 * 32)}
if os.environ.get("PURSAMERE_BENCH_SIZE") == "tiny":
    SIZES = {"tiny": (2, 3, 7)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bytes_moved(b, n, d, itemsize):
    """Compulsory bytes of one call: s [B*N, D] and eps [N, D] read, grad [B*N, D] and sqnorm [B*N] written."""
    return itemsize * (2 * b * n * d + n * d + b * n)


def make_call(impl, b, n, d, device, dtype=torch.float32):
    """A zero-argument function doing one call of `impl` on fresh inputs (synchronizing on CUDA)."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(n, d, generator=gen, dtype=dtype).to(device)
    s = torch.randn(b * n, d, generator=gen, dtype=dtype).to(device)
    sig_t = torch.tensor([0.5, 0.3], dtype=dtype, device=device)
    grad = torch.empty_like(s)
    sqnorm = torch.empty(b * n, dtype=dtype, device=device)
    if impl == "reference":
        def op():
            ere_residual_ref(s, eps, sig_t[1], n)
    else:
        fn = ere_residual if impl == "triton" else ere_residual_torch

        def op():
            fn(s, eps, sig_t[1], n, grad, sqnorm)
    return synced(op, device)


def run(benchmark, impl, device, b, n, d, dtype=torch.float32):
    """Benchmark one configuration and put GB/s in benchmark.extra_info."""
    device = torch.device(device)
    if impl == "triton" and not (device.type == "cuda" and use_triton(device)):
        pytest.skip("Triton is timed on CUDA only: the interpreter is not a performance path")
    call = make_call(impl, b, n, d, device, dtype)
    call()  # compile / warm up outside the timing
    benchmark(call)
    nbytes = bytes_moved(b, n, d, torch.finfo(dtype).bits // 8)
    benchmark.extra_info.update(impl=impl, device=str(device), B=b, N=n, D=d, bytes=nbytes)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_ere_residual(benchmark, impl, device, size):
    run(benchmark, impl, device, *SIZES[size])
