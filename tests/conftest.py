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
