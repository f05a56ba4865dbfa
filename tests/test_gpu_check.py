"""bench/gpu_check.sh, the device session's one command, at tiny sizes on the CPU, so that it
cannot rot before the one GPU run it is written for."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_ONLY = {"triton+graphs", "triton+graphs+bf16", "triton+graphs+bf16+cl", "triton+graphs/loop",
             "triton+graphs+bf16+cl+compile"}
# The tiny plan (gpu_check.plan(tiny=True)): B = 1 and 2 stand for 16 and 64.
PLANNED = ([(v, 1) for v in ("torch", "triton", "triton+graphs", "triton+graphs+bf16")]
           + [("reference", 1), ("triton+graphs", 1)]
           + [(v, 2) for v in ("torch", "triton", "triton+graphs", "triton+graphs+bf16")]
           + [("triton+graphs+bf16+cl", 1), ("triton+graphs+bf16+cl", 2), ("triton+graphs/loop", 1),
              ("triton+graphs/loop", 1), ("triton+graphs+bf16+cl+compile", 1),
              ("triton+graphs+bf16+cl+compile", 2)])
CUDA = torch.cuda.is_available()
FIGURES = ("t_first_call_s", "t_purify_s", "images_per_s", "t_network_s", "efficiency", "tflops", "flop_per_purify")


def _env(out):
    return {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def _sample_tests(tmp_path, body):
    path = tmp_path / "samples" / "test_sample.py"
    path.parent.mkdir()
    path.write_text("import time\n\nimport pytest\n\n\n" + body)
    return path


def _entries(doc):
    return sorted([(r["variant"], r["batch"]) for r in doc["results"]]
                  + [(s["variant"], s["batch"]) for s in doc["skipped"]])


def test_tiny_mode_writes_every_figure_and_records_test_outcomes(tmp_path):
    # A failing or hanging GPU test is recorded, with the outcomes before it, and does not stop
    # the benchmark part.
    tests = _sample_tests(tmp_path, "def test_passes():\n    pass\n\n\ndef test_fails():\n    assert 1 == 2\n\n\n"
                                    "def test_skips():\n    pytest.skip('not here')\n\n\n"
                                    "def test_hangs():\n    time.sleep(600)\n")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--tiny", "--tests", str(tests), "--tests-timeout-s", "5"],
                          cwd=ROOT, env=_env(out), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("*.json")
    assert {p.name for p in out.iterdir()} == {path.name, "tests.log", "gpu_check.log"}
    doc = json.loads(path.read_text())
    assert doc["current"] == "done" and doc["mode"].startswith("tiny") and doc["install"].startswith("skipped")
    assert doc["versions"]["torch"] == torch.__version__ and doc["flops"]["forward_per_image_sample"] > 0
    assert doc["errors"] == []

    t = doc["gpu_tests"]
    assert t["timed_out"] and t["returncode"] is None and "test_hangs" in t["output_tail"]
    assert t["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert [name.split("/")[-1] for name in t["failures"]] == ["test_sample.py::test_fails"]

    assert _entries(doc) == sorted(PLANNED)
    ran = {(r["variant"], r["batch"]) for r in doc["results"]}
    assert {("torch", 1), ("torch", 2), ("reference", 1)} <= ran
    for s in doc["skipped"]:
        assert not CUDA and s["variant"] in CUDA_ONLY and "CUDA" in s["reason"], s
    for row in doc["results"]:
        for key in FIGURES:
            assert math.isfinite(row[key]) and row[key] > 0, (row["variant"], key, row[key])
        assert row["rounds"] == len(row["t_purify_each_s"]) >= 1
        assert (row["peak_memory_gib"] > 0) if CUDA else (row["mfu"] is None and row["peak_memory_gib"] is None)
    assert set(doc["targets"]) and doc["ceilings"] == {"skipped": "measured at full size on CUDA only"}
    # The probes ran at the tiny size: on the CPU two runs agree bit for bit; no peak memory there.
    for setting in ("cudnn_deterministic", "defaults"):
        det = doc["determinism"][setting]
        assert det["forward_bitwise"] and det["input_grad_bitwise"] and det["purify_bitwise"], det
    for norm in ("linf", "l2"):
        assert doc["exact_memory"][norm]["wall_s"] > 0
        assert (doc["exact_memory"][norm]["per_row_gib"] > 0) if CUDA else doc["exact_memory"][norm]["peak_gib"] is None


def test_passed_deadline_still_writes_json_with_everything_skipped(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--out-dir", str(tmp_path),
                           "--deadline", "0"], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["gpu_tests"] == {"skipped": "deadline"} and doc["results"] == [] and doc["current"] == "done"
    assert doc["determinism"] == doc["exact_memory"] == {"skipped": "deadline"}
    assert _entries(doc) == sorted(PLANNED)
    for s in doc["skipped"]:
        assert s["reason"].startswith("deadline") or s["variant"] in CUDA_ONLY, s
    assert not (tmp_path / "tests.log").exists()


def test_failed_install_still_writes_a_result(tmp_path):
    # A stand-in interpreter with no torch, on which every pip install fails (the one from the
    # index hangs past its cap) and the driver cannot start: the script tries offline, offline
    # --no-deps, then the index for GPU_CHECK_NETWORK_S, and still leaves a JSON with the logs.
    calls = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n'
                    'if [[ "$1 $2" == "-m pip" && "$*" != *--no-index* ]]; then sleep 30; fi\nexit 1\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {**_env(out), "PYTHON": str(stub), "GPU_CHECK_NETWORK_S": "2", "GPU_CHECK_BUDGET_S": "60"}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert time.monotonic() - t0 < 25, "the index try was not cut at GPU_CHECK_NETWORK_S"
    assert proc.returncode != 0
    pips = [line for line in calls.read_text().splitlines() if line.startswith("-m pip install")]
    assert len(pips) == 3, pips
    assert "--no-index" in pips[0] and "--no-deps" not in pips[0] and pips[0].endswith("-e .[test]")
    assert "--no-index" in pips[1] and "--no-deps" in pips[1] and pips[1].endswith("-e .")
    assert "--no-index" not in pips[2] and "--retries 0" in pips[2]
    doc = json.loads((out / "gpu_check-failed.json").read_text())
    assert "FAILED" in doc["install"] and doc["gpu_check_exit"] != "0" and doc["install_log_tail"] is not None
