#!/usr/bin/env bash
# session 15, call 1 on a fresh machine with the landing build (main + 0001-0003): unpack; the Triton SSD anchor with
# the CPU idle, then ours; dumps in the background; the SSD, optimizer and layer tests (no dumps needed); the
# Transformer before / after / --logit-chunk 8192; wait for the dumps (call 2 runs the model tests)
set -uo pipefail; source wip_s14/device/env.sh
date; bash dev/device_run.sh unpack; chmod +x train_mamba* finetune_mamba prepare_data convert_hf build/* dev/bench_* 2>/dev/null
(cd anchors && timeout 150 python3 ../dev/anchor_mamba_ssm.py --part a --no-docs --ssd-shapes bench,2.7b) 2>&1 | tee -a $ANCHOR_LOG | grep -E "anchor ssd|rror" | tail -4
date; for s in 2.7b bench; do timeout 60 ./dev/bench_ssd --shape $s 2>&1 | tee -a $OUT/bench_ssd.log | grep -E "^  forward |^  forward\+backward|plan"; done
date; bash dev/device_run.sh dumps
timeout 200 ./build/test_gpu "[ssd],[optim],[layers]" --durations yes 2>&1 | tee $OUT/test_gpu_1.log | tail -4; grep -E "^[0-9.]+ s: " $OUT/test_gpu_1.log | sort -rn | head -4
date
T="nvidia-transformer-8b --pattern *+*+*+*+*+*+*+*+ -B 2 -T 4096"
set -f
steps "$T" ./train_mamba_before ./train_mamba "./train_mamba --logit-chunk 8192" 2>&1 | tee $OUT/transformer.log
set +f
date; timeout 120 bash dev/device_run.sh wait-dumps; date; tail -3 $OUT/dumps.log
