#!/usr/bin/env bash
# One device call: build, run the GPU tests, the benchmarks and the demonstration runs,
# keeping logs under $OUT. The device image has no Catch2: build/test_gpu is built on the
# development machine and carried in devbin/ (dev/device_run.sh prepare does that here).
# usage (on the device): bash dev/device_run.sh [steps...]
#   steps: build test bench train models recipe sft
set -uo pipefail
if [ "${1:-}" = prepare ]; then  # on the development machine
  make -j2 build/test_gpu && mkdir -p devbin && cp build/test_gpu devbin/ && exit 0
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PATH=/usr/local/cuda/bin:$PATH
steps=${*:-build test bench}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
brown="--train-data data/brown/brown_train_*.bin --val-data data/brown/brown_val_*.bin"
for s in $steps; do
  case $s in
    build) make -j16 train_mamba finetune_mamba prepare_data $(ls dev/bench_*.cu | sed 's/\.cu$//') 2>&1 | grep -E "error|warning" | tee "$OUT/build.log"
           make dumps > "$OUT/dumps.log" 2>&1 ;;
    test)  timeout 560 ./devbin/test_gpu 2>&1 | tee "$OUT/test_gpu.log" | tail -40 ;;
    bench) for b in dev/bench_*; do [ -x "$b" ] && { echo "== $b"; timeout 150 "$b"; }; done 2>&1 | tee "$OUT/bench.log"
           for r in "" "--recompute"; do
             ./train_mamba --model mamba2-370m --bench -B 8 -T 2048 $r 2>&1 | grep bench: | tee -a "$OUT/bench.log"
           done
           ./train_mamba --model hybrid-1.3b --bench -B 4 -T 2048 --recompute 2>&1 | grep bench: | tee -a "$OUT/bench.log" ;;
    models) # issue 4/5/6 demonstrations: the same 600 steps on the default corpus
           for m in "mamba2-tiny" "mamba-tiny" "hybrid-tiny" "transformer-tiny" "mamba2-tiny --layers 26" \
                    "mamba2-tiny --optimizer muon" "hybrid-tiny --optimizer muon"; do
             name=$(echo "$m" | tr ' ' '_' | tr -d '-')
             timeout 240 ./train_mamba --model $m $brown --sample-every 300 --ckpt-dir ckpt_$name > "$OUT/train_$name.log" 2>&1
             echo "$m: $(grep -E '^params:' "$OUT/train_$name.log") $(grep 'val loss' "$OUT/train_$name.log" | head -1 | cut -c1-40) -> $(grep 'val loss' "$OUT/train_$name.log" | tail -1) $(grep -E '^step +600' "$OUT/train_$name.log" | grep -oE '[0-9]+ tok/s')"
           done 2>&1 | tee "$OUT/models.log" ;;
    sft)   ./train_mamba $brown --steps 600 --ckpt-dir ckpt_pre --sample-every 0 > "$OUT/sft_pretrain.log" 2>&1
           make sft-data > "$OUT/sft_data.log" 2>&1
           bash data/sft_demo.sh ckpt_pre "$OUT" 2>&1 | tail -40 ;;
  esac
done
