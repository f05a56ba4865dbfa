#!/usr/bin/env bash
# Rerun the numerically sensitive tests (marker `numerics`) under other CPUs' kernels, so that a
# tolerance tuned to one CPU's rounding fails in CI rather than on the next user's machine.
# ATEN_CPU_CAPABILITY selects torch's own vectorised kernels, ONEDNN_MAX_CPU_ISA caps oneDNN's
# (convolutions); neither can go above what the CPU has, so on an AVX-512 machine this covers
# AVX2 and scalar/SSE4.1 CPUs, and on an AVX2 machine the scalar/SSE4.1 one.
set -euo pipefail
cd "$(dirname "$0")/.."
for kernels in "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" "ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41"; do
    echo "== numerics under $kernels"
    env $kernels python -m pytest -q -m numerics
done
