# sourced by every call: the bundle's libraries, the anchors, logs under $OUT
export OUT=${OUT:-/tmp/out} NCCL_NVLS_ENABLE=0 LD_LIBRARY_PATH=$PWD/devbin/bundle PYTHONUNBUFFERED=1
export ANCHOR_LOG=$OUT/anchors.log MAMBA_SRC=$PWD/anchors/mamba CC1D_SRC=$PWD/anchors/causal-conv1d
mkdir -p "$OUT"
# a before/after pair of step benchmarks: $1 the model and its flags; the binaries and extra flags after it
steps() {
  local m=$1; shift
  for run in "$@"; do
    timeout 90 $run --model $m --bench --bench-steps 10 2>&1 | grep -E "bench:|rror" | sed "s|^|$run $m: |"
  done
}
# a fresh machine: the bundle unpacked into place, runnable
unpack() {
  bash dev/device_run.sh unpack; chmod +x train_mamba* finetune_mamba prepare_data convert_hf build/* dev/bench_* 2>/dev/null
}
# one part of test_gpu: $1 the log's name, $2 the Catch2 filter, $3 seconds; prints the summary and the slowest cases
test_part() {
  timeout $3 ./build/test_gpu "$2" --durations yes 2>&1 | tee $OUT/$1.log | tail -3
  grep -E "^[0-9.]+ s: " $OUT/$1.log | sort -rn | head -6
}
# the model tests read the PyTorch dumps: wait for them, and say whether they finished
dumps_ready() {
  timeout ${1:-200} bash dev/device_run.sh wait-dumps; tail -2 $OUT/dumps.log
  ! pgrep -f "make dumps" >/dev/null || { echo "the dumps are still running: the model tests would fail on missing files"; return 1; }
}
KERNEL_TESTS="[ssd],[optim],[layers]" MODEL_TESTS="~[ssd]~[optim]~[layers]"
