"""The one gate: whether Triton runs, imports without Triton or a GPU, block sizes."""

import os
import subprocess
import sys
import textwrap

import pursamere_fast.kernels as K
import pytest
import torch

OPS = ("ere_residual", "mc_reduce_sam", "adam_project")


def _python(code, **env):
    """Run `code` in a fresh interpreter (imports must happen there, not in this process)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# Makes any GPU query at import time fail loudly.
_NO_GPU_QUERIES = """
    import torch
    def _gpu_query(*args, **kwargs):
        raise AssertionError("GPU queried at import time")
    for name in ("is_available", "device_count", "current_device", "get_device_properties", "init"):
        setattr(torch.cuda, name, _gpu_query)
"""


def test_imports_and_fallbacks_work_without_triton():
    out = _python(
        _NO_GPU_QUERIES
        + """
    import sys
    sys.modules["triton"] = None  # `import triton` now raises ImportError, as on non-Linux
    import importlib
    import pursamere_fast.kernels as K
    for op in ("ere_residual", "mc_reduce_sam", "adam_project"):
        importlib.import_module("pursamere_fast.kernels." + op)
    assert not K.triton_available()
    assert not K.use_triton(torch.device("cuda")) and not K.use_triton(torch.device("cpu"))

    from pursamere_fast.reference.ere_residual import ere_residual as ref
    s, eps, sigma = torch.randn(6, 5), torch.randn(3, 5), torch.tensor(0.3)
    grad, sqnorm = torch.empty(6, 5), torch.empty(6)
    K.ere_residual_torch(s, eps, sigma, 3, grad, sqnorm)
    expected_grad, expected_sqnorm = ref(s, eps, sigma, 3)
    assert torch.equal(grad, expected_grad)
    torch.testing.assert_close(sqnorm, expected_sqnorm)
    K.mc_reduce_sam_torch(torch.ones(2, 3, 5), torch.zeros(2, 5), eps, sigma, 0.1, "l2", torch.empty(2, 5))
    x = torch.full((2, 5), 0.5)
    K.adam_project_torch(x, x.clone(), torch.zeros(2, 5), torch.zeros(2, 5), torch.ones(2, 5),
                         torch.tensor(0.01), torch.tensor(0.1), torch.tensor(0.001),
                         beta1=0.9, beta2=0.999, adam_eps=1e-8, rho=1.0, norm="linf")
    assert torch.allclose(x, torch.full((2, 5), 0.49))

    try:
        K.ere_residual(s, eps, sigma, 3, grad, sqnorm)
    except RuntimeError as e:
        print("RuntimeError:", e)
    """,
        TRITON_INTERPRET="1",
    )
    assert "RuntimeError:" in out and "Triton is not installed" in out


def test_import_with_triton_queries_no_gpu():
    out = _python(
        _NO_GPU_QUERIES
        + """
    import pursamere_fast.kernels as K
    print(K.triton_available())
    """
    )
    assert out.strip() == str(K.triton_available())


def test_reexports():
    for op in OPS:
        assert callable(getattr(K, op)) and callable(getattr(K, op + "_torch"))
    assert callable(K.use_triton) and callable(K.triton_available)


def test_use_triton_follows_device_and_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert K.use_triton(torch.device("cuda")) == K.triton_available()
    assert not K.use_triton(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not K.use_triton(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.use_triton(torch.device("cpu")) == K.triton_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="without CUDA the kernels are tested under the interpreter")
def test_without_cuda_the_kernel_tests_run_the_interpreter():
    # conftest sets TRITON_INTERPRET=1 on machines without CUDA; if that broke, the op tests
    # would quietly test only the torch fallbacks on the CPU.
    assert K.triton_available() and K.use_triton(torch.device("cpu"))


def test_launcher_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s, eps, sigma = torch.randn(6, 5), torch.randn(3, 5), torch.tensor(0.3)
    with pytest.raises(RuntimeError, match="CUDA tensors or TRITON_INTERPRET=1|not installed"):
        K.ere_residual(s, eps, sigma, 3, torch.empty(6, 5), torch.empty(6))


def test_op_files_import_the_shared_module_not_the_package():
    # The package imports the op files; an op file importing from the package (`from . import`)
    # would close an import cycle.
    import ast
    from pathlib import Path

    for path in Path(K.__file__).parent.glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module is not None, f"{path.name} imports from the package itself (line {node.lineno})"


@pytest.mark.parametrize("n, expected", [(1, 16), (7, 16), (16, 16), (17, 32), (300, 512), (1024, 1024), (3072, 1024)])
def test_block_size(n, expected):
    assert K.block_size(n) == expected


def test_block_size_reads_max_block_at_call_time(monkeypatch):
    monkeypatch.setattr(K.common, "MAX_BLOCK", 64)
    assert K.block_size(300) == 64
    assert K.block_size(33) == 64
    assert K.block_size(20) == 32
