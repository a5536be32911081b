#!/usr/bin/env bash
# One device call: build, run the GPU tests and the benchmarks, keep logs under $OUT.
# usage (on the device): bash dev/device_run.sh [steps...]   steps: build test bench train
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PATH=/usr/local/cuda/bin:$PATH
steps=${*:-build test bench}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for s in $steps; do
  case $s in
    build) make -j16 all 2>&1 | tail -30 | tee "$OUT/build.log" ;;
    test)  make dumps >/dev/null 2>&1; ./build/test_gpu 2>&1 | tee "$OUT/test_gpu.log" | tail -60 ;;
    bench) [ -f anchors/anchor_ssd.py ] && PYTHONUNBUFFERED=1 timeout 180 python3 anchors/anchor_ssd.py 2>&1 | tail -2 | tee "$OUT/anchor.log"
           for b in dev/bench_*; do [ -x "$b" ] && { echo "== $b"; timeout 120 "$b"; }; done 2>&1 | tee "$OUT/bench.log"
           ./train_mamba --model mamba2-370m --bench -B 8 -T 2048 2>&1 | tail -3 | tee -a "$OUT/bench.log" ;;
    train) bash data/prepare_default.sh > "$OUT/data.log" 2>&1
           timeout 300 ./train_mamba --steps 400 --val-every 100 --sample-every 200 2>&1 | tee "$OUT/train.log" | grep -E "val|sample|error" ;;
  esac
done
