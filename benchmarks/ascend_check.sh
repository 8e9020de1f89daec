#!/usr/bin/env bash
# The Ascend check, on a machine with an Ascend NPU and CANN installed (not run by CI; it has not run on an Ascend
# device yet). The same plan as benchmarks/gpu_check.sh:
#   1. checks FIRST that MindSpore's Ascend plugin loads on this device and which CANN it uses: the device
#      (npu-smi), the CANN version, one kernel run on the device; if it does not load, it says so and stops;
#   2. runs the census's configurations on the device (tools/op_census.py --device Ascend), and lists the
#      operators MindSpore ran as AICPU kernels (host cores) in the default configuration's executed graph:
#      docs/operators.md expects none on parameter-sized tensors (Reshape is a nop node; StridedSlice is the
#      sharded path's, which needs two devices);
#   3. runs the reference tests of the composite path with device_target="Ascend", GRAPH and PYNATIVE mode, and
#      those of the 8-bit state (optim_bits=8: tests/test_optim_bits.py, the composite path);
#   4. times the composite Lamb step against MindSpore's composite AdamWeightDecay and nn.Adam on BERT-base
#      shapes, in both modes;
#   5. prints one short report (ascend_check_report.txt).
# Usage: bash benchmarks/ascend_check.sh [output dir]   (run from an environment with CANN set up, e.g. after
#        `source /usr/local/Ascend/ascend-toolkit/set_env.sh`; installs the package into .venv-ascend)
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/device_check_common.sh
start ascend "${1:-.}"

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
plugin_verdict ascend_check $? ascend_check_plugin.txt

# the AICPU kernels of the default configuration's executed graph
irs="$(mktemp -d)"
MS_DEV_SAVE_GRAPHS=2 MS_DEV_SAVE_GRAPHS_PATH="$irs" LAMB_CENSUS_DEVICE=Ascend \
    timeout 600 python tools/op_census.py --child default >> "$log" 2>&1
aicpu="$(grep -rhoE '[A-Za-z]+[^ ]*AICPU_KERNEL|AICPU[^ ,)]*' "$irs" 2>/dev/null | sort | uniq -c | head -20)"
say "# AICPU kernels in the executed graph (default): ${aicpu:-none found}"
rm -rf "$irs"

# 2-4. the census's configurations on the device, the reference tests, timings
device_checks Ascend
finish
