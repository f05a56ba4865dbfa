#!/usr/bin/env bash
# Fashion-MNIST evaluation queue (docs/results.md). Each job runs under torchrun on
# $NPROC processes of one CPU thread each (the runner shards batches over them) and is
# stopped at its time budget in seconds (override with B_<NAME>=...). Rows are flushed per
# batch and resumed on a rerun, so a stopped job keeps every finished batch and rerunning
# the same line continues where it stopped. Run from the repository root:
#   nohup scripts/run_fmnist.sh sweep > /dev/null 2>&1 &   # both validation sweeps
#   nohup scripts/run_fmnist.sh test > /dev/null 2>&1 &    # the test-set rows
#   scripts/run_fmnist.sh sam_exact sanity                 # or any jobs by name, in that order
#   scripts/run_fmnist.sh suite suite_sam autoattack       # the adaptive suite (issue 12)
#   python -m pursamere_fast.cli sweep collect --out results/fmnist runs/fmnist/test_none runs/fmnist/final/*
set -u
OUT=runs/fmnist
LOG=$OUT/jobs.log
NPROC=${NPROC:-2}
# The ADP baseline's setting chosen by configs/fmnist_sweep_adp.toml.
ADP=(--defences adp --adp sigma=0.05 --adp noise_std=0.05 --adp steps=5)
# The shipped config runs without SAM (the sweep's choice); both variants are named explicitly.
SAM=(--pursamere sam_radius=8/255)
NOSAM=(--pursamere sam_radius=0.0)
mkdir -p "$OUT/final"
export OMP_NUM_THREADS=1

job() {  # name budget_s module-or-command args...
  local name=$1 budget=$2
  shift 2
  local t0
  t0=$(date +%s)
  echo "$(date -u +%FT%TZ) start $name budget=${budget}s nproc=$NPROC: $*" >> "$LOG"
  nice -n 5 timeout -k 30 "$budget" python -m torch.distributed.run --nproc_per_node "$NPROC" "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$(date -u +%FT%TZ) end $name rc=$rc wall=$(( $(date +%s) - t0 ))s (rc 124: stopped at its budget)" >> "$LOG"
}

evaluate() {  # name budget_s config out extra-args...
  local name=$1 budget=$2 config=$3 out=$4
  shift 4
  job "$name" "$budget" -m pursamere_fast.cli evaluate --config "$config" --out "$OUT/final/$out" "$@"
}

MODELS=(--classifier pursamere_fast.pretrained:fashion_mnist_v1.classifier --score pursamere_fast.pretrained:fashion_mnist_v1.score
        --purify-config pursamere_fast.pretrained:fashion_mnist_v1.config --data pursamere_fast.pretrained:load_test_subset)

converge() {  # name budget_s threat steps restarts extra-args...: PGD convergence on 100 validation images
  local name=$1 budget=$2 threat=$3 steps=$4 restarts=$5
  shift 5
  NPROC=1 job "$name" "$budget" -m pursamere_fast.cli convergence "${MODELS[@]}" --validation 100 \
    --threat "$threat" --eps 8/255 --steps "$steps" --restarts "$restarts" --batch-size 20 --no-progress \
    --out "$OUT/conv/$name" "$@"
}

{ date -u +%FT%TZ; sha256sum pursamere_fast/pretrained/*.safetensors pursamere_fast/pretrained/*.json; } >> "$OUT/provenance.txt"

run() {  # one named job of the queue
  case "$1" in
    sweep_cost) job sweep_cost "${B_SWEEP:-2400}" -m pursamere_fast.cli sweep run --config configs/fmnist_sweep.toml --no-progress ;;
    sweep_adp) job sweep_adp "${B_SWEEP_ADP:-600}" -m pursamere_fast.cli sweep run --config configs/fmnist_sweep_adp.toml --no-progress ;;
    sam_main) evaluate sam_main "${B_SAM_MAIN:-3000}" configs/fmnist_main.toml sam_main "${SAM[@]}" ;;
    nosam_main) evaluate nosam_main "${B_NOSAM_MAIN:-1800}" configs/fmnist_main.toml nosam_main "${NOSAM[@]}" ;;
    adp_main) evaluate adp_main "${B_ADP_MAIN:-300}" configs/fmnist_main.toml adp_main "${ADP[@]}" ;;
    adp_budgets) evaluate adp_budgets "${B_ADP_BUDGETS:-200}" configs/fmnist_budgets.toml adp_budgets "${ADP[@]}" ;;
    adp_exact) evaluate adp_exact "${B_ADP_EXACT:-200}" configs/fmnist_exact.toml adp_exact "${ADP[@]}" ;;
    adp_bpda200) evaluate adp_bpda200 "${B_ADP_BPDA200:-250}" configs/fmnist_bpda200.toml adp_bpda200 "${ADP[@]}" ;;
    sam_exact) evaluate sam_exact "${B_SAM_EXACT:-750}" configs/fmnist_exact.toml sam_exact "${SAM[@]}" ;;
    sam_budgets) evaluate sam_budgets "${B_SAM_BUDGETS:-750}" configs/fmnist_budgets.toml sam_budgets "${SAM[@]}" ;;
    sam_bpda200) evaluate sam_bpda200 "${B_SAM_BPDA200:-750}" configs/fmnist_bpda200.toml sam_bpda200 "${SAM[@]}" ;;
    nosam_exact) evaluate nosam_exact "${B_NOSAM_EXACT:-350}" configs/fmnist_exact.toml nosam_exact "${NOSAM[@]}" ;;
    nosam_budgets) evaluate nosam_budgets "${B_NOSAM_BUDGETS:-350}" configs/fmnist_budgets.toml nosam_budgets "${NOSAM[@]}" ;;
    nosam_bpda200) evaluate nosam_bpda200 "${B_NOSAM_BPDA200:-350}" configs/fmnist_bpda200.toml nosam_bpda200 "${NOSAM[@]}" ;;
    bf16_clean) evaluate bf16_clean "${B_BF16_CLEAN:-1500}" configs/fmnist_bf16.toml bf16_main "${NOSAM[@]}" --score-dtype bfloat16 ;;
    bf16_bpda) evaluate bf16_bpda "${B_BF16_BPDA:-900}" configs/fmnist_bf16_bpda.toml bf16_bpda "${NOSAM[@]}" --score-dtype bfloat16 ;;
    sanity) NPROC=1 job sanity "${B_SANITY:-2400}" -m pursamere_fast.cli sanity --config configs/fmnist_sanity.toml ;;
    none) NPROC=1 job none "${B_NONE:-900}" -m pursamere_fast.cli evaluate --config configs/fmnist_none.toml ;;
    suite) evaluate suite "${B_SUITE:-3600}" configs/fmnist_suite.toml suite ;;
    # The SAM variant alone in a directory of its own (the suite's transfer member pairs the
    # defences of one run, and adding a defence to the finished run would leave it incomplete).
    suite_sam) evaluate suite_sam "${B_SUITE_SAM:-3600}" configs/fmnist_suite.toml suite_sam "${SAM[@]}" \
                 --defences pursamere ;;
    autoattack) NPROC=1 evaluate autoattack "${B_AUTOATTACK:-1800}" configs/fmnist_suite.toml suite --autoattack-only ;;
    conv_bpda) converge conv_bpda "${B_CONV_BPDA:-5400}" bpda 200 3 --defence pursamere ;;
    conv_exact) converge conv_exact "${B_CONV_EXACT:-2700}" exact 50 3 --defence pursamere ;;
    *) echo "unknown job: $1" >&2; return 2 ;;
  esac
}

case "${1:-}" in
  sweep) set -- sweep_cost sweep_adp ;;
  test) set -- nosam_main sam_main adp_main adp_budgets adp_exact nosam_exact nosam_budgets nosam_bpda200 \
               sam_exact sam_budgets sam_bpda200 adp_bpda200 sanity ;;   # the shipped (no-SAM) config first
  "") echo "usage: $0 sweep|test|none|JOB..." >&2; exit 2 ;;
esac
for name in "$@"; do run "$name"; done
