#!/usr/bin/env bash
# The device session's one command (docs/gpu.md), from the repository root:
#     bash bench/gpu_check.sh           # GPU machine: install, GPU tests, NCSNv2 benchmark -> $OUT/<gpu>.json
#     bash bench/gpu_check.sh --tiny    # CPU: the same driver at tiny sizes, no install (tests/test_gpu_check.py)
# Everything ends within GPU_CHECK_BUDGET_S (default 540) seconds of wall time from the start,
# the install included. bench/gpu_check.py rewrites the JSON after every step, so a run cut
# short keeps every figure it finished. Other arguments go to bench/gpu_check.py.
# Environment: OUT (default: a new temporary folder), PYTHON (default python3).
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
    # Offline first: the device machine reaches no package index, and its image has every
    # dependency; then PyPI (whose default torch on Linux x86-64 is a CUDA build).
    if timeout 120 "$PY" -m pip install --disable-pip-version-check --no-index --no-build-isolation \
        "${pins[@]}" -e ".[test]" >>"$log" 2>&1; then
        echo "pip install --no-index --no-build-isolation -e .[test]: ok; $kept"
    elif timeout 300 "$PY" -m pip install --disable-pip-version-check --retries 1 --timeout 20 \
        "${pins[@]}" -e ".[test]" >>"$log" 2>&1; then
        echo "pip install -e .[test] (from the index): ok; $kept"
    else
        echo "pip install -e .[test] FAILED, offline and from the index (install.log); $kept"
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
echo "gpu_check: exit $rc after $(($(date +%s) - start)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
