#!/usr/bin/env bash
# The Ascend check, on a machine with an Ascend NPU and CANN installed (not run by CI; it has not run on an Ascend
# device yet). The same plan as benchmarks/gpu_check.sh:
#   1. checks FIRST that MindSpore's Ascend plugin loads on this device and which CANN it uses: the device
#      (npu-smi), the CANN version, one kernel run on the device; if it does not load, it says so and stops;
#   2. runs the census's configurations on the device (tools/op_census.py --device Ascend), and lists the
#      operators MindSpore ran as AICPU kernels (host cores) in the default configuration's executed graph:
#      docs/operators.md expects none on parameter-sized tensors (Reshape is a nop node; StridedSlice is the
#      sharded path's, which needs two devices);
#   3. runs the reference tests of the composite path with device_target="Ascend", GRAPH and PYNATIVE mode;
#   4. times the composite Lamb step against MindSpore's composite AdamWeightDecay and nn.Adam on BERT-base
#      shapes, in both modes;
#   5. prints one short report (ascend_check_report.txt).
# Usage: bash benchmarks/ascend_check.sh [output dir]   (run from an environment with CANN set up, e.g. after
#        `source /usr/local/Ascend/ascend-toolkit/set_env.sh`; installs the package into .venv-ascend)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
mkdir -p "$out"
log="$out/ascend_check.txt"
report="$out/ascend_check_report.txt"
: > "$log"
: > "$report"
say() { echo "$*" | tee -a "$report"; }

python3 -m venv .venv-ascend && . .venv-ascend/bin/activate || { say "ascend_check: no virtual environment"; exit 1; }
{
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".[test]"
} >> "$log" 2>&1 || say "ascend_check: installing the environment FAILED (see $log)"

# 1. the plugin on this device, first
say "# device: $(npu-smi info 2>&1 | grep -m1 -E '910|310|Ascend' | tr -s ' ' || echo 'npu-smi not found')"
cann="${ASCEND_HOME_PATH:-/usr/local/Ascend/ascend-toolkit/latest}"
say "# CANN: $(cat "$cann"/*/ascend_toolkit_install.info "$cann"/version.cfg 2>/dev/null | grep -m1 -iE 'version' || echo "not found under $cann")"
timeout 900 python - >> "$log" 2>&1 <<'EOF'
import sys
import numpy as np
import mindspore as ms
from mindspore import Tensor
try:
    ms.set_context(device_target="Ascend", mode=ms.PYNATIVE_MODE)
    y = (Tensor(np.arange(4, dtype=np.float32)) * 2 + 1).asnumpy()
    line = f"plugin loads, one kernel ran: {'yes' if (y == np.arange(4) * 2 + 1).all() else 'WRONG RESULT ' + str(y)}"
    code = 0
except Exception as err:
    line, code = f"plugin does NOT load or run: {type(err).__name__}: {str(err).splitlines()[0][:300]}", 3
open("ascend_check_plugin.txt", "w").write(line + "\n")
sys.exit(code)
EOF
status=$?
[ -f ascend_check_plugin.txt ] && sed 's/^/# /' ascend_check_plugin.txt | tee -a "$report" && rm -f ascend_check_plugin.txt
if [ "$status" -ne 0 ]; then
  say "ascend_check: MindSpore's Ascend plugin does not run here: nothing else was run (see $log)"
  exit 1
fi

# 2. the census's configurations on the device, and the AICPU kernels of the executed graph
configs="default,groups+schedule,nvlamb,loss_scale+exact_skip,mu_dtype=float16,float16_params"
timeout 1200 python tools/op_census.py --device Ascend --graphs Ascend --configs "$configs" >> "$log" 2>&1 \
    && say "# census on Ascend ($configs): every configuration ran, every operator has a native kernel" \
    || say "# census on Ascend: FAILED or an operator without a native kernel (see $log)"
irs="$(mktemp -d)"
MS_DEV_SAVE_GRAPHS=2 MS_DEV_SAVE_GRAPHS_PATH="$irs" LAMB_CENSUS_DEVICE=Ascend \
    timeout 600 python tools/op_census.py --child default >> "$log" 2>&1
aicpu="$(grep -rhoE '[A-Za-z]+[^ ]*AICPU_KERNEL|AICPU[^ ,)]*' "$irs" 2>/dev/null | sort | uniq -c | head -20)"
say "# AICPU kernels in the executed graph (default): ${aicpu:-none found}"
rm -rf "$irs"

# 3. the reference tests of the composite path on the device
LAMB_TEST_DEVICE=Ascend timeout 1800 python -m pytest -q -p no:cacheprovider tests/test_update_rule.py \
    tests/test_nonfinite.py tests/test_float32_accuracy.py -k "composite or 16bit" >> "$log" 2>&1
say "# tests on Ascend: $(grep -E 'passed|failed' "$log" | tail -1)"

# 4. the composite step against composite AdamWeightDecay
for mode in graph pynative; do
  timeout 900 python benchmarks/bench_step.py --device Ascend --mode "$mode" --sets base \
      --opts Lamb-composite,AdamWeightDecay-composite,Adam --repeats 20 >> "$log" 2>&1 \
      || say "# bench_step $mode: FAILED"
done
grep -E "mode on|composite Lamb /|Lamb-composite|AdamWeightDecay-composite" "$log" >> "$report"
echo "---- $report"
cat "$report"
