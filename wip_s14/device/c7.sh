#!/usr/bin/env bash
# the tests first, in one call on a fresh machine (for when device time is short): unpack, the dumps in the
# background, test_gpu "[ssd],[optim],[layers]" beside them, then the rest in whatever of the 590 s is left
set -uo pipefail; source wip_s14/device/env.sh
date; bash dev/device_run.sh unpack; chmod +x train_mamba* finetune_mamba prepare_data convert_hf build/* dev/bench_* 2>/dev/null
bash dev/device_run.sh dumps
timeout 240 ./build/test_gpu "[ssd],[optim],[layers]" --durations yes 2>&1 | tee $OUT/test_gpu_1.log | tail -3; grep -E "^[0-9.]+ s: " $OUT/test_gpu_1.log | sort -rn | head -4
date; timeout 200 bash dev/device_run.sh wait-dumps; date; tail -2 $OUT/dumps.log
left=$((585 - SECONDS)); echo "part 2 gets $left s"
timeout $left ./build/test_gpu "~[ssd]~[optim]~[layers]" --durations yes 2>&1 | tee $OUT/test_gpu_2.log | tail -3; grep -E "^[0-9.]+ s: " $OUT/test_gpu_2.log | sort -rn | head -8; date
