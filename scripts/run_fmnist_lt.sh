#!/usr/bin/env bash
# Fashion-MNIST-LT benchmark of SGD, SAM, ImbSAM and SSE-SAM (docs/optim.md), 3 seeds each.
#
# Training set: the long-tailed subset at imbalance ratio R = 100 (subset seed 0, the same for
# every run): 6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60 images of classes 0..9.
# Test set: all 10,000 test images (balanced, 1000 per class).
# Every run: SmallCNN width 8, 8 epochs (936 steps) at batch 128, SGD momentum 0.9, weight
# decay 5e-4, peak lr 0.05 with cosine decay, one CPU thread. Width 8 and 8 epochs keep the
# dearest run (SSE-SAM: 3 forward + 4 backward passes per step in phase 1) near 4 minutes on
# the 2-core development machine under load (28 s per SSE-SAM epoch measured).
# Radii: SAM rho 0.05 (the usual SAM radius); SSE-SAM rho_H 0.05, rho_T 0.10, gamma 0.7 (the
# paper's defaults); ImbSAM rho 0.10, the tail radius SSE-SAM ends with, so that the two
# differ only by SSE-SAM's phase-1 head perturbation. Tail classes (ImbSAM, SSE-SAM): fewer
# than eta = 1000 training images, i.e. classes 4..9.
#
# Each finished run writes $RES/runs/<optimizer>_seed<s>.json (per-class test accuracy, wall
# time, settings); a run whose JSON exists is skipped, and a run stopped half-way resumes from
# its checkpoint in $OUT. Then `python scripts/summaries/fmnist_lt.py` writes summary.md
# and per_class.png. Run from the repository root with the virtual environment active
# (`. .venv/bin/activate`; the data comes from /usr/share/datasets/fashion-mnist or
# $PURSAMERE_FASHION_MNIST, see pursamere_fast/data.py):
#   nohup scripts/run_fmnist_lt.sh > runs/fmnist_lt.log 2>&1 &
set -u
OUT=${OUT:-runs/fmnist_lt}
RES=${RES:-results/fmnist_lt}
EPOCHS=${EPOCHS:-8}
SEEDS=${SEEDS:-"0 1 2"}
OPTIMIZERS=${OPTIMIZERS:-"sgd sam imbsam ssesam"}
LOG=$OUT/jobs.log
# One thread, so that the benchmark leaves the other core to the rest of the machine.
export OMP_NUM_THREADS=1
COMMON=(--imbalance-ratio 100 --subset-seed 0 --width 8 --epochs "$EPOCHS" --batch-size 128
        --lr 0.05 --schedule cosine --weight-decay 5e-4 --momentum 0.9 --threads 1 --no-progress)
settings() {
  case "$1" in
    sgd) echo "--optimizer sgd" ;;
    sam) echo "--optimizer sam --rho 0.05" ;;
    imbsam) echo "--optimizer imbsam --rho 0.10 --tail-threshold 1000" ;;
    ssesam) echo "--optimizer ssesam --rho-head 0.05 --rho-tail 0.10 --gamma 0.7 --tail-threshold 1000" ;;
    *) echo "unknown optimizer $1" >&2; exit 2 ;;
  esac
}
mkdir -p "$OUT" "$RES/runs"

for seed in $SEEDS; do
  for opt in $OPTIMIZERS; do
    name=${opt}_seed$seed
    if [ -f "$RES/runs/$name.json" ]; then
      echo "$(date -u +%FT%TZ) skip $name (done)" >> "$LOG"
      continue
    fi
    # shellcheck disable=SC2046  # the settings are words on purpose
    cmd=(python -m pursamere_fast.cli train-classifier --out "$OUT/$name" --seed "$seed" "${COMMON[@]}"
         $(settings "$opt"))
    echo "$(date -u +%FT%TZ) start $name: ${cmd[*]}" >> "$LOG"
    t0=$(date +%s)
    nice -n 5 "${cmd[@]}" > "$OUT/$name.log" 2>&1
    rc=$?
    wall=$(( $(date +%s) - t0 ))
    echo "$(date -u +%FT%TZ) end $name rc=$rc wall=${wall}s" >> "$LOG"
    [ "$rc" -eq 0 ] || continue
    python - "$OUT/$name/metrics.json" "$RES/runs/$name.json" "$opt" "$seed" "$wall" "${cmd[*]}" <<'EOF'
import json
import os
import platform
import sys

import torch

src, dst, opt, seed, wall, command = sys.argv[1:]
m = json.loads(open(src).read())
with open("/proc/cpuinfo") as f:
    cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
row = {"optimizer": opt, "seed": int(seed), "wall_s": int(wall),
       "train_seconds": m["seconds_this_invocation"], "steps": m["steps"],
       "settings": m["optimizer"], "lr": m["args"]["lr"], "epochs": m["args"]["epochs"],
       "width": m["args"]["width"], "imbalance_ratio": m["args"]["imbalance_ratio"],
       "train_class_counts": m["train_class_counts"], "tail_classes": m["tail_classes"],
       "test_accuracy": m["test_accuracy"], "test_accuracy_per_class": m["test_accuracy_per_class"],
       "test_class_counts": m["test_class_counts"], "command": command,
       "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": 1}}
tmp = dst + ".tmp"
with open(tmp, "w") as f:
    json.dump(row, f, indent=1)
os.replace(tmp, dst)
EOF
  done
done
echo "$(date -u +%FT%TZ) queue done" >> "$LOG"
