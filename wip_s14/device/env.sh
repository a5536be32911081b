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
