#!/usr/bin/env bash
# Tiny BERT pretraining with LAMB on the King James Bible, end to end on CPU.
# Usage (from anywhere): bash model_zoo_examples/bert/run_tiny.sh [more train.py options, e.g. --resume]
# Writes everything under runs/bert_tiny/ at the repository root; a second run reuses the data cache.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export GLOG_v="${GLOG_v:-3}"   # MindSpore's C++ log: errors only
exec python model_zoo_examples/bert/train.py --config model_zoo_examples/bert/configs/tiny.yaml \
    --output_dir runs/bert_tiny --device_target CPU "$@"
