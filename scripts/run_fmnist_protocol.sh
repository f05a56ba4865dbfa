#!/usr/bin/env bash
# The Fashion-MNIST protocol of issue 13 (docs/protocol.md, "Fashion-MNIST") in one command,
# from anywhere:
#
#   scripts/run_fmnist_protocol.sh [--smoke] [--score SCORE_FILE] [--test-n N] [OUT_DIR]
#
# OUT_DIR: default runs/fmnist_protocol (runs/fmnist_protocol_smoke with --smoke).
# --score SCORE_FILE: a finished train-score file (e.g. OUT_DIR/models/score.safetensors of a
# training run in the background, or its --export) used instead of the train_score stage; its
# metadata must show --dataset fashion-mnist and --holdout of at least [train] holdout.
# --test-n N: this pass runs every test job on its first N test images only (the jobs in the
# order main, suite, bpda200, each for both classifiers, then the report at that n); a rerun
# with a larger N, or without the option, extends the same runs to their full n.
# Every setting is in configs/fmnist_protocol.toml and the configs/fmnist_{select,test_*}.toml
# templates. Stages, each logged to OUT_DIR/logs/<stage>.log, whose first line is the
# equivalent command:
#   train_score    the U-Net score model on the training set less its last 5,000 images
#                  (resumable: a rerun continues from OUT_DIR/train_score/);
#   score_quality  its denoising and cost beside the shipped score model's, on held-out images;
#   train_clean    SmallCNN with the shipped recipe on the same 55,000 images;
#   select         the selection suite on the first held-out images for the 18 PurSAMERE and 5
#                  ADP points of configs/fmnist_select.toml, with the clean classifier;
#   choose         the rule of configs/fmnist_protocol.toml picks one point with SAM, one
#                  without, and one ADP point (OUT_DIR/select/choice.md);
#   train_aug      SmallCNN on clean plus purified images (CE(x) + CE(purify(x)), the chosen
#                  SAM-off point);
#   test_<classifier>_<job>  configs/fmnist_test_{main,suite,bpda200}.toml on the test set, in
#                  that order, each for the clean and the augmented classifier; then
#                  OUT_DIR/report.md and report.png.
# Rerunning the same command continues: training resumes from its checkpoint, evaluations skip
# the rows already on disk (flushed per batch), and a run with other settings or weights is
# refused rather than mixed in. CPU cost per stage: configs/fmnist_protocol.toml (about 110
# CPU-hours at the cheapest choice).
# --smoke: the identical pipeline at toy size ([smoke] of configs/fmnist_protocol.toml), for a
# synthetic Fashion-MNIST directory (tests/test_protocol.py).
# Environment: PURSAMERE_FASHION_MNIST (the IDX files' directory; default Debian's
# /usr/share/datasets/fashion-mnist), PURSAMERE_DEVICE (cpu, cuda, cuda:<index>; default: cuda
# when available), PYTHON (default: python).
set -euo pipefail
usage="usage: $0 [--smoke] [--score SCORE_FILE] [--test-n N] [OUT_DIR]"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) echo "$usage"; exit 0 ;;
    --smoke) ARGS+=(--smoke); shift ;;
    --score)
      [ $# -ge 2 ] || { echo "$0: error: --score: expected a file" >&2; exit 2; }
      [ -f "$2" ] || { echo "$0: error: --score: no such file: $2" >&2; exit 2; }
      ARGS+=(--score "$2"); shift 2 ;;
    --test-n)
      [ $# -ge 2 ] || { echo "$0: error: --test-n: expected a number of images" >&2; exit 2; }
      ARGS+=(--test-n "$2"); shift 2 ;;
    -*) echo "$0: error: unknown option: $1 ($usage)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -gt 1 ]; then echo "$0: error: at most one OUT_DIR ($usage)" >&2; exit 2; fi
# One process runs every stage (the same commands as pursamere-fast train-score, score-quality,
# train-classifier and evaluate, in-process): a torch import per stage would cost more than the
# smoke run's work.
exec "${PYTHON:-python}" -m pursamere_fast.cli protocol run \
  --protocol "$(cd "$(dirname "$0")/../configs" && pwd)/fmnist_protocol.toml" --device "${PURSAMERE_DEVICE:-auto}" \
  "${ARGS[@]}" "$@"
