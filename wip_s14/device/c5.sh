#!/usr/bin/env bash
# a fresh machine with the landing build (main + 0001-0003): the Triton SSD anchor with the CPU idle, then ours;
# the dumps in the background; the kernel tests (no dumps needed); the Transformer before / after /
# --logit-chunk 8192; the dumps waited for (c6.sh runs the model tests)
set -uo pipefail; source wip_s14/device/env.sh
date; unpack
(cd anchors && timeout 150 python3 ../dev/anchor_mamba_ssm.py --part a --no-docs --ssd-shapes bench,2.7b) 2>&1 | tee -a $ANCHOR_LOG | grep -E "anchor ssd|rror" | tail -4
date; for s in 2.7b bench; do timeout 60 ./dev/bench_ssd --shape $s 2>&1 | tee -a $OUT/bench_ssd.log | grep -E "^  forward |^  forward\+backward|plan"; done
date; bash dev/device_run.sh dumps
test_part test_gpu_1 "$KERNEL_TESTS" 200
date
T="nvidia-transformer-8b --pattern *+*+*+*+*+*+*+*+ -B 2 -T 4096"
set -f
steps "$T" ./train_mamba_before ./train_mamba "./train_mamba --logit-chunk 8192" 2>&1 | tee $OUT/transformer.log
set +f
date; dumps_ready 120; date
