"""Shared fixtures. On a machine without CUDA the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any kernel is decorated, so it is set here, before the
package is imported by any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


@pytest.fixture(params=_devices())
def device(request):
    return torch.device(request.param)


# (B, N, D) for the kernel tests: odd sizes with tails. On the CPU MAX_BLOCK is lowered to 64
# so D = 105 and 300 loop over several blocks and D = 7 is one masked block; CUDA runs real
# sizes with 1024-blocks.
KERNEL_SHAPES_CPU = [(1, 1, 7), (3, 5, 105), (1, 5, 300), (3, 1, 300)]
KERNEL_SHAPES_CUDA = [(2, 1, 7), (16, 8, 3072), (5, 3, 784), (64, 8, 3 * 32 * 32)]


@pytest.fixture
def shapes(device, monkeypatch):
    if device.type == "cpu":
        from pursamere_fast.kernels import common

        monkeypatch.setattr(common, "MAX_BLOCK", 64)
        return KERNEL_SHAPES_CPU
    return KERNEL_SHAPES_CUDA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: a second intra-op thread only adds contention on a shared CPU (60 toy
    training steps: 1.8 s with 1 thread, 14 s with 2 under load). Subprocesses also run
    with OMP_NUM_THREADS=1, so in-process and subprocess results are comparable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_report_header(config):
    # Which CPU kernels ran: tolerances must hold under all of them (tests/cpu_kernels.sh).
    return (f"torch {torch.__version__}, CPU kernels: ATen {torch.backends.cpu.get_cpu_capability()}, "
            f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(native)')}")
