#!/usr/bin/env bash
# call 2 (~8 min): the new kernels' tests (SSD, gradient norm, norms), the Transformer (tuned, long logit
# chunks), then the anchors' extension builds in the background for call 4
set -uo pipefail; source wip_s14/device/env.sh
date; bash dev/device_run.sh wait-dumps
timeout 240 ./build/test_gpu "[ssd],[optim],[layers]" --durations yes 2>&1 | tee $OUT/test_gpu_1.log | tail -4; grep -E "^[0-9.]+ s: " $OUT/test_gpu_1.log | sort -rn | head -6
date
T="nvidia-transformer-8b --pattern *+*+*+*+*+*+*+*+ -B 2 -T 4096"
set -f
steps "$T" ./train_mamba_before ./train_mamba "./train_mamba --tune-matmuls" "./train_mamba --tune-matmuls --logit-chunk 8192" 2>&1 | tee $OUT/transformer.log
set +f
date; bash dev/device_run.sh anchor-build; date
