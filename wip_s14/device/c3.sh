#!/usr/bin/env bash
# call 3 (~8 min): the rest of test_gpu (the models against the dumps, ZeRO and graphs with --tune-matmuls)
set -uo pipefail; source wip_s14/device/env.sh
date; timeout 540 ./build/test_gpu "~[ssd]~[optim]~[layers]" --durations yes 2>&1 | tee $OUT/test_gpu_2.log | tail -4; grep -E "^[0-9.]+ s: " $OUT/test_gpu_2.log | sort -rn | head -10; date
