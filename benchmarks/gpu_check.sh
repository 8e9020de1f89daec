#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU (not run by CI; it has not run on a GPU yet). MindSpore 2.10's
# wheel carries GPU plugins built for CUDA 11 (PTX for sm_60 and sm_86 only): this installs the CUDA 11 runtime
# and cuDNN 8 libraries from the package index (nvidia-*-cu11 wheels) into a virtual environment of its own, then
#   1. checks FIRST that the plugin loads on this card and says which CUDA it uses: the card and its compute
#      capability, the plugin MindSpore picked, one kernel run on the device (the PTX is compiled for this card
#      on first use), and whether bfloat16 Cast and Assign kernels exist (Lamb refuses bfloat16 on GPU until
#      they do, docs/operators.md); if the plugin does not load, it says so and stops;
#   2. runs the census's configurations on the device (tools/op_census.py --device GPU; one GPU: not the
#      sharded one, which needs two);
#   3. runs the reference tests of the composite path with device_target="GPU", GRAPH and PYNATIVE mode, and
#      those of the 8-bit state (optim_bits=8: tests/test_optim_bits.py, the composite path);
#   4. times the composite Lamb step against MindSpore's composite AdamWeightDecay and nn.Adam on BERT-base
#      shapes, in both modes, with the peak device memory of each, and the 8-bit step (--optim-bits 8);
#   5. prints one short report (gpu_check_report.txt).
# Usage: bash benchmarks/gpu_check.sh [output dir]     (about 10 minutes; writes gpu_check.txt and the report)
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/device_check_common.sh
start gpu "${1:-.}"
{
  python -m pip install --quiet nvidia-cuda-runtime-cu11 nvidia-cublas-cu11 nvidia-cudnn-cu11 nvidia-cufft-cu11 \
      nvidia-curand-cu11 nvidia-cusolver-cu11 nvidia-cusparse-cu11 nvidia-cuda-nvrtc-cu11 nvidia-nccl-cu11
} >> "$log" 2>&1 || say "gpu_check: installing the CUDA 11 libraries FAILED (see $log)"
LD_LIBRARY_PATH="$(python -c 'import glob, os, site; print(":".join(sorted(glob.glob(os.path.join(site.getsitepackages()[0], "nvidia", "*", "lib")))))'):${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH

# 1. the plugin on this card, first
say "# card: $(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
timeout 900 python - >> "$log" 2>&1 <<'EOF'
import glob, os, sys
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops
lines = []
try:
    ms.set_context(device_target="GPU", mode=ms.PYNATIVE_MODE)
    x = Tensor(np.arange(4, dtype=np.float32))
    y = (x * 2 + 1).asnumpy()
    lines.append(f"plugin loads, one kernel ran: {'yes' if (y == np.arange(4) * 2 + 1).all() else 'WRONG RESULT ' + str(y)}")
except Exception as err:                                    # the plugin or the PTX does not load on this card
    lines.append(f"plugin does NOT load or run: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    open("gpu_check_plugin.txt", "w").write("\n".join(lines) + "\n")
    sys.exit(3)
maps = [l.split()[-1] for l in open(f"/proc/{os.getpid()}/maps") if "libcudart" in l or "libmindspore_gpu" in l]
lines.append("libraries loaded: " + ", ".join(sorted({os.path.basename(m) for m in maps})))
for what, run in (("bfloat16 Cast", lambda: ops.cast(Tensor(np.ones(4, np.float32)), ms.bfloat16).float().asnumpy()),
                  ("bfloat16 Assign", lambda: ops.assign(Parameter(Tensor(np.zeros(4, np.float32), ms.bfloat16), name="p"),
                                                         Tensor(np.ones(4, np.float32), ms.bfloat16)).float().asnumpy())):
    try:
        run()
        lines.append(f"{what}: runs (Lamb refuses bfloat16 on GPU: a kernel exists, lift the refusal)")
    except Exception as err:
        lines.append(f"{what}: no kernel ({str(err).splitlines()[0][:160]})")
open("gpu_check_plugin.txt", "w").write("\n".join(lines) + "\n")
EOF
plugin_verdict gpu_check $? gpu_check_plugin.txt

# 2-4. the census's configurations on the device (one GPU: not the sharded one), the reference tests, timings
device_checks GPU
finish
