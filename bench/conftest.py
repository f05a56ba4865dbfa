"""Benchmark settings. PURSAMERE_BENCH_SIZE=tiny shrinks every benchmark so the test suite
can run them once (tests/test_bench_smoke.py) and they cannot rot."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

TINY = os.environ.get("PURSAMERE_BENCH_SIZE") == "tiny"


@pytest.fixture
def bench_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(op, device):
    """`op` followed by a device sync on CUDA: what a benchmark must time."""
    if device.type != "cuda":
        return op

    def call():
        op()
        torch.cuda.synchronize(device)

    return call
