#!/usr/bin/env bash
# call 1 (~8 min): unpack; the dumps in the background; the Triton SSD anchor with the CPU still idle, then
# bench_ssd beside it (the SSD forward plan); the steps before / after / --tune-matmuls; the norm benches
set -uo pipefail; source wip_s14/device/env.sh
date; bash dev/device_run.sh unpack dumps; chmod +x train_mamba* finetune_mamba prepare_data convert_hf build/* dev/bench_* 2>/dev/null
(cd anchors && timeout 150 python3 ../dev/anchor_mamba_ssm.py --part a --no-docs --ssd-shapes bench,370m,2.7b,T1024,T512) 2>&1 | tee -a $ANCHOR_LOG | grep -E "anchor|rror" | tail -8
date; timeout 120 ./dev/bench_ssd 2>&1 | tee $OUT/bench_ssd.log | grep -vE "^ +[0-9]" | tail -40
date
for m in "mamba2-2.7b -B 4 -T 2048" "hybrid-1.3b -B 4 -T 2048" "mamba2-370m -B 8 -T 2048"; do
  steps "$m" ./train_mamba_before ./train_mamba "./train_mamba --tune-matmuls"
done 2>&1 | tee $OUT/steps.log
date
for m in 2.7b hybrid-1.3b 370m; do echo "== bench_layers --model $m"; timeout 50 ./dev/bench_layers --model $m; done 2>&1 | tee $OUT/bench_layers.log | grep -iE "==|norm|column-sum"
date
