#!/usr/bin/env bash
# The device session's one command (docs/gpu.md), from the repository root:
#     bash bench/gpu_check.sh           # GPU machine: install, GPU tests, NCSNv2 benchmark -> $OUT/<gpu>.json
#     bash bench/gpu_check.sh --tiny    # CPU: the same driver at tiny sizes, no install (tests/test_gpu_check.py)
# Everything ends within GPU_CHECK_BUDGET_S (default 540) seconds of wall time from the start,
# the install included. bench/gpu_check.py rewrites the JSON after every step, so a run cut
# short keeps every figure it finished; if it wrote none (a failed install, no torch), this
# script writes $OUT/gpu_check-failed.json from the logs. Other arguments go to gpu_check.py.
# Environment: OUT (default: a new temporary folder), PYTHON (default python3),
# GPU_CHECK_BUDGET_S (default 540), GPU_CHECK_NETWORK_S (the index try's cap, default 30).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-540}
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
tiny=0
for arg in "$@"; do [[ $arg == --tiny ]] && tiny=1; done

# Prints one line saying how the package was installed; pip's output goes to $OUT/install.log.
install_package() {
    local log=$OUT/install.log pins=() kept="no CUDA torch was importable before"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$log" 2>&1
    if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' >>"$log" 2>&1; then
        # The CUDA torch already there (the device image's) stays: pinned, pip can neither
        # replace nor upgrade it, nor the triton built for it.
        local constraints
        constraints=$(mktemp)
        "$PY" -c 'import torch; print(f"torch=={torch.__version__}")' >"$constraints"
        "$PY" -c 'import triton; print(f"triton=={triton.__version__}")' >>"$constraints" 2>>"$log"
        pins=(--constraint "$constraints")
        kept="kept $(tr '\n' ' ' <"$constraints")"
    fi
    # Three tries, each bounded: (1) offline, with every dependency (the device image has them
    # all when it is as last seen); (2) offline, the package alone (--no-deps): torch and triton
    # are there, and a missing test dependency then fails only the tests that import it instead
    # of the whole run; (3) the index, capped at GPU_CHECK_NETWORK_S (default 30) seconds, for
    # a machine that reaches one (the device machine reaches none: the former 300 s try there
    # would have spent over half the budget waiting).
    local net_s=${GPU_CHECK_NETWORK_S:-30}
    if timeout 120 "$PY" -m pip install --disable-pip-version-check --no-index --no-build-isolation \
        "${pins[@]}" -e ".[test]" >>"$log" 2>&1; then
        echo "pip install --no-index --no-build-isolation -e .[test]: ok; $kept"
    elif timeout 60 "$PY" -m pip install --disable-pip-version-check --no-index --no-build-isolation --no-deps \
        -e . >>"$log" 2>&1; then
        echo "pip install --no-index --no-build-isolation --no-deps -e . (offline with dependencies failed): ok; $kept"
    elif timeout "$net_s" "$PY" -m pip install --disable-pip-version-check --retries 0 --timeout 10 \
        "${pins[@]}" -e ".[test]" >>"$log" 2>&1; then
        echo "pip install -e .[test] (from the index): ok; $kept"
    else
        echo "pip install FAILED offline, offline --no-deps and from the index (${net_s} s cap): see install.log; $kept"
    fi
}

if ((tiny)); then
    note="skipped (--tiny runs in the environment at hand)"
else
    note="$(install_package) ($(($(date +%s) - start)) s)"
fi
echo "install: $note"

# The driver stops starting measurements 10 s before the end (its last write and exit); the
# timeout is the hard stop should a measurement overrun its prediction.
left=$((start + budget - $(date +%s)))
((left < 1)) && left=1
timeout -k 5 "$left" "$PY" bench/gpu_check.py --out-dir "$OUT" --deadline $((start + budget - 10)) \
    --install-note "$note" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
# A driver that could not start (no package, no torch) or died before its first write leaves
# no JSON: write one from the logs, with the standard library only, so every run returns a result.
if ! compgen -G "$OUT/*.json" >/dev/null; then
    for py in "$PY" python3; do
        "$py" - "$OUT" "$note" "$rc" <<'PYEOF' && break
import json, pathlib, subprocess, sys
out, note, rc = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def tail(name):
    path = out / name
    return path.read_text(errors="replace")[-3000:] if path.exists() else None
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
                         capture_output=True, text=True, timeout=20).stdout
except (OSError, subprocess.SubprocessError) as exc:
    smi = repr(exc)
doc = dict(current="failed before the driver wrote anything", install=note, gpu_check_exit=rc, nvidia_smi=smi,
           gpu_check_log_tail=tail("gpu_check.log"), install_log_tail=tail("install.log"))
(out / "gpu_check-failed.json").write_text(json.dumps(doc, indent=1) + "\n")
PYEOF
    done
fi
echo "gpu_check: exit $rc after $(($(date +%s) - start)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
