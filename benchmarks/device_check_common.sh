# Shared steps of benchmarks/gpu_check.sh and benchmarks/ascend_check.sh (sourced from the repository root).

# start NAME [OUT]: $log and $report in OUT (default .), emptied; `say` prints a line and adds it to the report;
# a virtual environment .venv-NAME with the package and its test extra, activated
start() {
  local out="${2:-.}"
  mkdir -p "$out"
  log="$out/$1_check.txt"
  report="$out/$1_check_report.txt"
  : > "$log"
  : > "$report"
  python3 -m venv ".venv-$1" && . ".venv-$1/bin/activate" || { say "$1_check: no virtual environment"; exit 1; }
  { python -m pip install --quiet --upgrade pip && python -m pip install --quiet -e ".[test]"; } >> "$log" 2>&1 \
      || say "$1_check: installing the environment FAILED (see $log)"
}
say() { echo "$*" | tee -a "$report"; }

# plugin_verdict NAME STATUS FILE: the plugin check's lines into the report; stop when it did not run
plugin_verdict() {
  [ -f "$3" ] && sed 's/^/# /' "$3" | tee -a "$report" && rm -f "$3"
  if [ "$2" -ne 0 ]; then
    say "$1: MindSpore's plugin does not run on this device: nothing else was run (see $log)"
    exit 1
  fi
}

# device_checks DEVICE: the census's configurations, the composite path's reference tests and the timings there
device_checks() {
  local device="$1" configs="default,groups+schedule,nvlamb,loss_scale+exact_skip,mu_dtype=float16,float16_params,optim_bits=8"
  timeout 1200 python tools/op_census.py --device "$device" --graphs "$device" --configs "$configs" >> "$log" 2>&1 \
      && say "# census on $device ($configs): every configuration ran, every operator has a native kernel" \
      || say "# census on $device: FAILED or an operator without a native kernel (see $log)"
  LAMB_TEST_DEVICE="$device" timeout 1800 python -m pytest -q -p no:cacheprovider tests/test_update_rule.py \
      tests/test_nonfinite.py tests/test_float32_accuracy.py -k "composite or 16bit" >> "$log" 2>&1
  say "# tests on $device: $(grep -E 'passed|failed' "$log" | tail -1)"
  # the 8-bit state (optim_bits=8) on the composite path: the reference tests and the step norms
  LAMB_TEST_DEVICE="$device" timeout 1200 python -m pytest -q -p no:cacheprovider tests/test_optim_bits.py \
      -k "composite and (reference or lr_times)" >> "$log" 2>&1
  say "# 8-bit tests on $device: $(grep -E 'passed|failed' "$log" | tail -1)"
  for mode in graph pynative; do
    timeout 900 python benchmarks/bench_step.py --device "$device" --mode "$mode" --sets base \
        --opts Lamb-composite,AdamWeightDecay-composite,Adam --repeats 20 >> "$log" 2>&1 \
        || say "# bench_step $mode: FAILED"
  done
  timeout 900 python benchmarks/bench_step.py --device "$device" --sets base --opts Lamb-composite,Adam \
      --repeats 20 --optim-bits 8 >> "$log" 2>&1 || say "# bench_step --optim-bits 8: FAILED"
}

# finish: the timings' lines into the report, and the report
finish() {
  grep -E "mode on|composite Lamb /|Lamb-composite|AdamWeightDecay-composite" "$log" >> "$report"
  echo "---- $report"
  cat "$report"
}
