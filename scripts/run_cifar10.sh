#!/usr/bin/env bash
# The CIFAR-10 protocol (docs/protocol.md, "CIFAR-10") in one command, from anywhere:
#
#   scripts/run_cifar10.sh [--smoke] NCSNV2_CHECKPOINT CIFAR10_DIR [OUT_DIR]
#
# NCSNV2_CHECKPOINT: the official NCSNv2 CIFAR-10 checkpoint (checkpoint.pth of the official
# runner; its width and sigma ladder are read from it). CIFAR10_DIR: the extracted
# cifar-10-python.tar.gz (cifar-10-batches-py or its parent). OUT_DIR: default runs/cifar10
# (runs/cifar10_smoke with --smoke).
# Every setting is in configs/cifar10_protocol.toml and the configs/cifar10_*.toml templates.
# Stages, each logged to OUT_DIR/logs/<stage>.log, whose first line is the equivalent command:
#   train_clean  WRN-28-10 on the training set less its last 5,000 images (held out).
#   select       the adaptive suite on the first held-out images for the 18 PurSAMERE points of
#                configs/cifar10_select.toml, with the clean classifier;
#   choose       the rule of configs/cifar10_protocol.toml picks one point with SAM and one
#                without (OUT_DIR/select/choice.md).
#   train_aug    the same WRN trained on clean plus purified images (CE(x) + CE(purify(x)),
#                the chosen SAM-off point).
#   test_<classifier>_<job>  configs/cifar10_test_{main,bpda200,suite}.toml on the test set,
#                for the clean and the augmented classifier; then OUT_DIR/report.md and report.png.
# Rerunning the same command continues: training resumes from its checkpoint (a finished one
# only re-measures test accuracy), evaluations skip the rows already on disk (flushed per
# batch), and a run with other settings is refused rather than mixed in.
# --smoke: the identical pipeline at toy size ([smoke] of configs/cifar10_protocol.toml), for a
# synthetic CIFAR-format directory and a small checkpoint (tests/test_protocol.py).
# Environment: PURSAMERE_DEVICE (cpu, cuda, cuda:<index>; default: cuda when available),
# PYTHON (default: python).
set -euo pipefail
usage="usage: $0 [--smoke] NCSNV2_CHECKPOINT CIFAR10_DIR [OUT_DIR]"
SMOKE=()
if [ "${1:-}" = "--smoke" ]; then SMOKE=(--smoke); shift; fi
case "${1:-}" in -h|--help) echo "$usage"; exit 0 ;; esac
if [ $# -lt 2 ] || [ $# -gt 3 ]; then echo "$usage" >&2; exit 2; fi
[ -f "$1" ] || { echo "$0: error: NCSNV2_CHECKPOINT: no such file: $1" >&2; exit 2; }
[ -d "$2" ] || { echo "$0: error: CIFAR10_DIR: no such directory: $2" >&2; exit 2; }
# One process runs every stage (the same commands as pursamere-fast train-classifier and
# evaluate, in-process): a torch import per stage would cost more than the smoke run's work.
exec "${PYTHON:-python}" -m pursamere_fast.cli protocol run \
  --protocol "$(cd "$(dirname "$0")/../configs" && pwd)/cifar10_protocol.toml" --device "${PURSAMERE_DEVICE:-auto}" \
  "${SMOKE[@]}" --score "$1" --data-root "$2" "${@:3}"
