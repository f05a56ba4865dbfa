#!/usr/bin/env bash
# Fashion-MNIST runs of the heterogeneous-noise purifier (docs/hetero.md), each resumable (rows
# are flushed per batch; rerun the same line to continue) and stopped at its budget in seconds:
#   python -m pursamere_fast.cli sweep run --config configs/fmnist_sweep_hetero.toml   # validation
#   scripts/run_fmnist_hetero.sh suite       # the chosen setting under the suite (test set)
#   scripts/run_fmnist_hetero.sh controls    # uniform t_s, uniform t_l, random mask
# then `python scripts/summaries/fmnist_hetero.py runs/fmnist/final`.
set -u
LOG=runs/fmnist/jobs.log
export OMP_NUM_THREADS=1
mkdir -p runs/fmnist/final
run() {  # name budget config
  echo "$(date -u +%FT%TZ) start $1 budget=$2s" >> "$LOG"
  local t0=$(date +%s)
  timeout -k 30 "$2" pursamere-fast evaluate --config "$3" > "runs/fmnist/$1.log" 2>&1
  echo "$(date -u +%FT%TZ) end $1 rc=$? wall=$(( $(date +%s) - t0 ))s (rc 124: stopped at its budget)" >> "$LOG"
}
for job in "$@"; do
  case "$job" in
    suite) run hetero_suite "${B_SUITE:-3600}" configs/fmnist_suite_hetero.toml ;;
    controls) run hetero_controls "${B_CONTROLS:-2400}" configs/fmnist_suite_hetero_controls.toml ;;
    *) echo "unknown job $job (suite, controls)" >&2; exit 2 ;;
  esac
done
