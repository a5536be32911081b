#!/usr/bin/env bash
# a warm machine after c7.sh: the Triton SSD anchor with the CPU idle, then ours; the Transformer and 370m
# before / after / --logit-chunk 8192
set -uo pipefail; source wip_s14/device/env.sh
date
(cd anchors && timeout 150 python3 ../dev/anchor_mamba_ssm.py --part a --no-docs --ssd-shapes bench,2.7b) 2>&1 | tee -a $ANCHOR_LOG | grep -E "anchor ssd|rror" | tail -4
date; for s in 2.7b bench; do timeout 60 ./dev/bench_ssd --shape $s 2>&1 | tee -a $OUT/bench_ssd.log | grep -E "^  forward |^  forward\+backward|plan"; done
date
T="nvidia-transformer-8b --pattern *+*+*+*+*+*+*+*+ -B 2 -T 4096"
set -f
steps "$T" ./train_mamba_before ./train_mamba "./train_mamba --logit-chunk 8192" 2>&1 | tee $OUT/transformer.log
steps "mamba2-370m" ./train_mamba "./train_mamba --logit-chunk 8192" 2>&1 | tee $OUT/m370.log
set +f; date
