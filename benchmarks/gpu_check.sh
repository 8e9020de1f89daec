#!/usr/bin/env bash
# The GPU row of the benchmarks, on a machine with an NVIDIA GPU (not run by CI; no GPU was lent to the
# session that wrote it, so it has not run yet). MindSpore 2.10's wheel carries GPU plugins built for
# CUDA 11: this installs the CUDA 11 runtime and cuDNN 8 libraries from the package index (nvidia-*-cu11
# wheels) into a virtual environment of its own, then
#   1. runs the reference tests of the composite path (the path GPUs take), GRAPH and PYNATIVE mode, with
#      device_target="GPU": every configuration in float32, float16 and bfloat16 parameters, non-finite steps;
#   2. times the composite Lamb step against MindSpore's composite AdamWeightDecay (its bars: call 1.3x, first
#      call 2x) and nn.Adam on BERT-base shapes, in both modes, with the peak device memory of each;
#   3. prints one short report (gpu_check_report.txt): the test summary line and the bars.
# Usage: bash benchmarks/gpu_check.sh [output dir]     (about 10 minutes; writes gpu_check.txt and the report)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python3 -m venv .venv-gpu
. .venv-gpu/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[test]"
python -m pip install --quiet nvidia-cuda-runtime-cu11 nvidia-cublas-cu11 nvidia-cudnn-cu11 nvidia-cufft-cu11 \
    nvidia-curand-cu11 nvidia-cusolver-cu11 nvidia-cusparse-cu11 nvidia-cuda-nvrtc-cu11 nvidia-nccl-cu11
LD_LIBRARY_PATH="$(python -c 'import glob, os, site; print(":".join(sorted(glob.glob(os.path.join(site.getsitepackages()[0], "nvidia", "*", "lib")))))'):${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python -c "import mindspore as ms; ms.set_context(device_target='GPU'); ms.run_check()"
  LAMB_TEST_DEVICE=GPU python -m pytest -q -p no:cacheprovider tests/test_update_rule.py tests/test_nonfinite.py \
      tests/test_float32_accuracy.py -k "composite or 16bit" || echo "gpu_check: the tests FAILED"
  for mode in graph pynative; do
    python benchmarks/bench_step.py --device GPU --mode "$mode" --sets base \
        --opts Lamb-composite,AdamWeightDecay-composite,Adam --repeats 20 || echo "gpu_check: bench_step FAILED"
  done
} 2>&1 | tee "$out/gpu_check.txt"
grep -E "^# CPU|mode on|passed|failed|composite Lamb /|Lamb-composite|AdamWeightDecay-composite" \
    "$out/gpu_check.txt" > "$out/gpu_check_report.txt" || true
cat "$out/gpu_check_report.txt"
