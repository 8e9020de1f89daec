#!/usr/bin/env bash
# CI step: the package against the oldest MindSpore release it supports, in its own fresh environment
# (.venv-oldest), on the fast core of the tests. MindSpore 2.7.0 is not supported: in PYNATIVE_MODE,
# loading a checkpoint into a cell that has already stepped corrupts the heap and kills the process
# (MindSpore's own nn.Adam and nn.AdamWeightDecay too); 2.7.1 fixed it.
# Runs from the repository root of a fresh clone, CI=true, no stdin; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

OLDEST=2.7.1
TESTS=(tests/test_update_rule.py tests/test_errors.py tests/test_checkpoint.py tests/test_modes.py
       tests/test_train_step.py tests/test_faults.py tests/test_optim_bits.py)

rm -rf .venv-oldest
python3 -m venv .venv-oldest
PY=.venv-oldest/bin/python
"$PY" -m pip install --quiet "mindspore==$OLDEST" "numpy<2" pytest
# --no-deps: the release pinned above stays, whatever range setup.cfg declares
"$PY" -m pip install --quiet --no-deps -e .
"$PY" -c 'import sys, mindspore, numpy
print("mindspore", mindspore.__version__, "numpy", numpy.__version__)
sys.exit(0 if mindspore.__version__ == sys.argv[1] else "expected mindspore " + sys.argv[1])' "$OLDEST"

# A fresh kernel cache: the fused CPU kernel is compiled on first use under this release.
MINDSPORE_LAMB_CACHE="$(mktemp -d)/cache"
export MINDSPORE_LAMB_CACHE
trap 'rm -rf "$(dirname "$MINDSPORE_LAMB_CACHE")"' EXIT
"$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
