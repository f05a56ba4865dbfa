#!/usr/bin/env bash
# Fashion-MNIST evaluation queue (docs/results.md): one job at a time on one CPU thread, each
# stopped at its time budget in seconds (override with B_<NAME>=...). Rows are flushed per
# batch and resumed on a rerun, so a stopped job keeps every finished batch and rerunning
# the same line continues where it stopped. Run from the repository root:
#   nohup configs/run_fmnist.sh sweep > /dev/null 2>&1 &
#   nohup configs/run_fmnist.sh test > /dev/null 2>&1 &
#   python -m pursamere_fast.attacks.sweep collect --out results/fmnist runs/fmnist/test_* runs/fmnist/sanity
set -u
OUT=runs/fmnist
LOG=$OUT/jobs.log
mkdir -p "$OUT"
export OMP_NUM_THREADS=1

job() {  # name budget_s command...
  local name=$1 budget=$2
  shift 2
  local t0
  t0=$(date +%s)
  echo "$(date -u +%FT%TZ) start $name budget=${budget}s: $*" >> "$LOG"
  nice -n 5 timeout "$budget" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$(date -u +%FT%TZ) end $name rc=$rc wall=$(( $(date +%s) - t0 ))s (rc 124: stopped at its budget)" >> "$LOG"
}

{ date -u +%FT%TZ; sha256sum pursamere_fast/pretrained/*.safetensors pursamere_fast/pretrained/*.json; } >> "$OUT/provenance.txt"

case "${1:-}" in
  sweep)
    job sweep "${B_SWEEP:-2400}" python -m pursamere_fast.attacks.sweep run --config configs/fmnist_sweep.toml --no-progress
    ;;
  test)
    job sam_linf8 "${B_SAM_LINF8:-720}" pursamere-fast evaluate --config configs/fmnist_sam_linf8.toml
    job nosam_linf8 "${B_NOSAM_LINF8:-360}" pursamere-fast evaluate --config configs/fmnist_nosam_linf8.toml
    job adp "${B_ADP:-300}" pursamere-fast evaluate --config configs/fmnist_adp.toml
    job sam_budgets "${B_SAM_BUDGETS:-300}" pursamere-fast evaluate --config configs/fmnist_sam_budgets.toml
    job sam_bpda200 "${B_SAM_BPDA200:-400}" pursamere-fast evaluate --config configs/fmnist_sam_bpda200.toml
    job sam_exact "${B_SAM_EXACT:-200}" pursamere-fast evaluate --config configs/fmnist_sam_exact.toml
    job sanity "${B_SANITY:-300}" pursamere-fast sanity --config configs/fmnist_sanity.toml
    ;;
  none)
    job none "${B_NONE:-900}" pursamere-fast evaluate --config configs/fmnist_none.toml
    ;;
  *)
    echo "usage: $0 sweep|test|none" >&2
    exit 2
    ;;
esac
