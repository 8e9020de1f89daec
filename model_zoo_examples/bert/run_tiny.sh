#!/usr/bin/env bash
# Tiny BERT pretraining with LAMB on the King James Bible, end to end on CPU, in BERT's two phases:
# phase 1 on 32-token sequences (batch 128), phase 2 on 64-token sequences from phase 1's weights.
# Usage (from anywhere): bash model_zoo_examples/bert/run_tiny.sh [more train.py options, e.g. --resume]
# Writes everything under runs/bert_tiny/phase1 and runs/bert_tiny/phase2 at the repository root;
# a second run reuses the data caches, and needs --resume (continue; after a complete run: evaluate only)
# or --overwrite (train again, deleting the first run's checkpoints).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export GLOG_v="${GLOG_v:-3}"   # MindSpore's C++ log: errors only
TRAIN=(python model_zoo_examples/bert/train.py --config model_zoo_examples/bert/configs/tiny.yaml --device_target CPU)
"${TRAIN[@]}" --output_dir runs/bert_tiny/phase1 "$@"
"${TRAIN[@]}" --output_dir runs/bert_tiny/phase2 --phase 2 --init_checkpoint runs/bert_tiny/phase1 "$@"
