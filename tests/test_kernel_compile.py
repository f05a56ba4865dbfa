"""Every Triton kernel variant the purification loop launches compiles ahead of time for sm_80
and sm_90, without a GPU, with no register spill and float64 variants computing in float64.

The variants are found by `bench/kernel_resources.py`, which records the launches of one loop
step per configuration (float32/float64 x linf/l2 x SAM on/off x CIFAR-10 / ImageNet-256 /
Fashion-MNIST x N = 8, 2, 1) and compiles each distinct one (36, for sm_80 and sm_90) to a
cubin with the ptxas shipped in the Triton wheel. It runs once per session here in a
subprocess (kernels decorated under TRITON_INTERPRET=1, as this suite does on a CPU, cannot be
compiled); 30 s on 2 shared cores with an empty Triton cache, 10 s with a warm one.
"""

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import kernel_resources as kr  # noqa: E402

MISSING = kr.missing_tools()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"cannot compile ahead of time here: {MISSING}")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_resources")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_resources.py"), "--out-dir", str(out)],
                          cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / f"{kr.STEM}.md").read_text().count("| _") == len(json.loads((out / f"{kr.STEM}.json").read_text())
                                                                      ["rows"])
    return json.loads((out / f"{kr.STEM}.json").read_text())


def _name(row):
    return f"{row['kernel']} {row['dtype']} {row['constexprs']} {row['arch']}"


def test_every_launched_variant_compiles_for_sm80_and_sm90(table):
    failed = [f"{_name(r)}: {r['error']}" for r in table["rows"] if "error" in r]
    assert not failed, "\n".join(failed)
    archs = {}
    for r in table["rows"]:
        archs.setdefault((r["kernel"], r["dtype"], json.dumps(r["constexprs"])), set()).add(r["arch"])
        assert r["cubin_bytes"] > 0 and r["registers"] > 0, _name(r)
    assert all(a == {"sm_80", "sm_90"} for a in archs.values()), archs


def test_no_register_spills(table):
    spilling = [f"{_name(r)}: {r['spill_stores']} B spill stores, {r['spill_loads']} B loads, {r['local']} B local"
                for r in table["rows"] if "error" not in r and kr.spills(r)]
    assert not spilling, "\n".join(spilling)


def test_variants_cover_every_kernel_and_configuration(table):
    # Every configuration was run, with one launch per op (two mc_reduce_sam and two ERE
    # residuals with SAM): what the loop's step() does.
    assert len(table["configurations"]) == 2 * 2 * 2 * len(kr.SHAPES) * len(kr.N_SAMPLES) == 72
    for label, count in table["launches_per_configuration"].items():
        assert count == (5 if "sam=on" in label else 3), (label, count)
        assert {r["kernel"] for r in table["rows"] if label in r["configs"]} == {
            "_ere_residual_kernel", "_mc_reduce_sam_kernel", "_adam_project_kernel"}, label
    # Every @triton.jit kernel of the op modules is launched by the loop (none untested).
    from pursamere_fast import kernels

    defined = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        defined |= {name for name in vars(module) if name.startswith("_") and name.endswith("_kernel")}
    assert {r["kernel"] for r in table["rows"]} == defined
    # Both dtypes and both norms reach the kernels that branch on them.
    seen = {(r["kernel"], r["dtype"], r["constexprs"].get("L2")) for r in table["rows"]}
    for dtype in ("float32", "float64"):
        for l2 in (False, True):
            assert ("_adam_project_kernel", dtype, l2) in seen and ("_mc_reduce_sam_kernel", dtype, l2) in seen


def test_float64_variants_compute_in_float64(table):
    leaks = [f"{_name(r)}: {leak}" for r in table["rows"] if "error" not in r for leak in kr.float32_leaks(r)]
    assert not leaks, "\n".join(leaks)
    assert any(r["dtype"] == "float64" and r["constexprs"].get("L2") for r in table["rows"])


def test_float32_leak_check_catches_what_triton_3_6_compiled():
    # The float64 l2 Adam variant as Triton 3.6 compiled it before its constants were typed
    # (bench/kernel_resources.py under triton 3.6.0): rho = 16/255 and the 1e-12 floor rounded
    # to float32 and widened back. The check must name both; the fixed constants pass.
    constexprs = {"N": 8, "BETA1": 0.9, "BETA2": 0.999, "ADAM_EPS": 1e-08, "RHO": 16 / 255, "L2": True,
                  "WRITE_Y": True, "BLOCK": 1024}
    good = [["f64", v] for v in (0.0, 1e-12, 1e-08, 0.0010000000000000009, 16 / 255, 0.09999999999999998, 0.9,
                                 0.999, 1.0)]
    bad = good + [["f64", 9.999999960041972e-13], ["f64", 0.062745101749897]]
    row = dict(dtype="float64", constexprs=constexprs)
    assert kr.float32_leaks(dict(row, ttir_float_constants=good)) == []
    leaks = kr.float32_leaks(dict(row, ttir_float_constants=bad))
    assert len(leaks) == 2 and "float32(1e-12)" in leaks[0] + leaks[1] and "float32(0.0627" in leaks[0] + leaks[1]
    assert kr.float32_leaks(dict(row, ttir_float_constants=[["f32", 0.5]])) == ["float32 constant 0.5"]


def test_float_constants_reads_decimal_and_hex():
    # MLIR prints a float64 that does not round-trip in a few decimal digits as its bits.
    ttir = ("%cst = arith.constant dense<1.000000e-12> : tensor<1024xf64>\n"
            "%c = arith.constant 0x3FB0101010101010 : f64\n%d = arith.constant 2.000000e+00 : f32\n")
    assert kr.float_constants(ttir) == [("f32", 2.0), ("f64", 1e-12), ("f64", 16 / 255)]
