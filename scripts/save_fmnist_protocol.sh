#!/usr/bin/env bash
# Copy a protocol run's work back to results/fmnist_protocol, to be committed before a session stops:
#
#   scripts/save_fmnist_protocol.sh [RUN_DIR]     # default runs/fmnist_protocol
#
# Everything the driver cannot re-create comes: the stages' checkpoints, rows (flushed per
# batch, so a running stage's partial rows too), logs. Left out: the suite's adversarial
# examples (adv/: they stay in the run directory; a rerun of the suite job writes them again),
# what it re-creates from the checkpoints (models/, the exports classifier.safetensors and
# score_ema.safetensors), the train_aug purified-set cache (purified.npy, 172 MB: 27 min on two
# threads), and this directory's own README.md (the run directory holds an older copy of it).
# The finished stages' metrics.json files record each rerun's seconds: restore those with
# `git checkout` when nothing else in them changed.
set -euo pipefail
src=${1:-runs/fmnist_protocol}
[ -d "$src" ] || { echo "$0: error: RUN_DIR: no such directory: $src" >&2; exit 2; }
here=$(cd "$(dirname "$0")/../results/fmnist_protocol" && pwd)
# A mirror: each directory here that the run has is replaced by the run's, so that rank shards
# a finished job merged into rows.jsonl do not stay behind beside it.
for d in "$src"/*/; do
  name=$(basename "$d")
  [ "$name" = models ] || rm -rf "${here:?}/$name"
done
tar -C "$src" --exclude=./models --exclude=./test/*/suite/adv --exclude=purified.npy --exclude=classifier.safetensors --exclude=score_ema.safetensors \
  --exclude=./README.md --exclude=./driver.out -cf - . | tar -C "$here" -xf -
