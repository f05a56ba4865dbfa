"""Micro-benchmark of adam_project: reference, torch fallback and Triton launcher.

    python -m pytest bench/bench_adam_project.py --benchmark-only

GB/s counts the compulsory traffic: x, x_adv, m, v, g read and x, m, v written once each;
with y_next also eps_next read and y_next written (l2 reads x and x_adv a second time, which
is not counted). The Triton launcher is timed only on CUDA (the interpreter is not a
performance path). `run` is importable so that smoke tests can call it at tiny sizes.
"""

import os

import pytest
import torch
from conftest import synced
from pursamere_fast.kernels import adam_project, adam_project_torch, use_triton
from pursamere_fast.reference.adam_project import adam_project as adam_project_ref

IMPLS = ("reference", "torch", "triton")
# (B, N, D); PURSAMERE_BENCH_SIZE=tiny (the suite's smoke run) shrinks them.
SIZES = {"fmnist": (16, 8, 784), "cifar10": (16, 8, 3 * 32 * 32)}
if os.environ.get("PURSAMERE_BENCH_SIZE") == "tiny":
    SIZES = {"tiny": (2, 3, 7)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CONSTANTS = dict(beta1=0.9, beta2=0.999, adam_eps=1e-8)


def bytes_moved(b, n, d, itemsize, y_next):
    """Compulsory bytes of one call: 5 [B, D] reads and 3 [B, D] writes; with y_next also
    eps_next [N, D] read and y_next [B, N, D] written."""
    nbytes = 8 * b * d
    if y_next:
        nbytes += n * d + b * n * d
    return itemsize * nbytes


def make_call(impl, norm, y_next, b, n, d, device, dtype=torch.float32):
    """A zero-argument function doing one call of `impl` (synchronizing on CUDA). The state
    is updated in place call after call, which does not change the work of a call. The
    reference builds y_next with plain torch when asked, for a like-for-like time."""
    gen = torch.Generator().manual_seed(0)
    x_adv = torch.rand(b, d, generator=gen, dtype=dtype).to(device)
    x = x_adv.clone()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    g = torch.randn(b, d, generator=gen, dtype=dtype).to(device)
    eps = torch.randn(n, d, generator=gen, dtype=dtype).to(device)
    sched = torch.tensor([0.01, 0.1, 0.001, 0.3], dtype=dtype, device=device)  # lr, bc1, bc2, sigma
    rho = 8 / 255 if norm == "linf" else 0.5
    nxt = dict(y_next=torch.empty(b, n, d, dtype=dtype, device=device), eps_next=eps, sigma_next=sched[3])
    if not y_next:
        nxt = {}
    if impl == "reference":
        def op():
            x_new, _, _ = adam_project_ref(x, x_adv, m, v, g, sched[0], sched[1], sched[2], rho=rho, norm=norm,
                                           **CONSTANTS)  # fmt: skip
            if y_next:
                x_new[:, None] + sched[3] * eps[None]
    else:
        fn = adam_project if impl == "triton" else adam_project_torch

        def op():
            fn(x, x_adv, m, v, g, sched[0], sched[1], sched[2], rho=rho, norm=norm, **CONSTANTS, **nxt)
    return synced(op, device)


def run(benchmark, impl, norm, y_next, device, b, n, d, dtype=torch.float32):
    """Benchmark one configuration and put GB/s in benchmark.extra_info."""
    device = torch.device(device)
    if impl == "triton" and not (device.type == "cuda" and use_triton(device)):
        pytest.skip("Triton is timed on CUDA only: the interpreter is not a performance path")
    call = make_call(impl, norm, y_next, b, n, d, device, dtype)
    call()  # compile / warm up outside the timing
    benchmark(call)
    nbytes = bytes_moved(b, n, d, torch.finfo(dtype).bits // 8, y_next)
    benchmark.extra_info.update(impl=impl, norm=norm, y_next=y_next, device=str(device), B=b, N=n, D=d, bytes=nbytes)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("y_next", [True, False], ids=["y_next", "no_y"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("impl", IMPLS)
def test_adam_project(benchmark, impl, norm, y_next, device, size):
    run(benchmark, impl, norm, y_next, device, *SIZES[size])
