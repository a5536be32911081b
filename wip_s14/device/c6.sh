#!/usr/bin/env bash
# session 15, call 2 (warm machine after c5.sh): the rest of test_gpu (the models against the dumps, ZeRO, graphs)
set -uo pipefail; source wip_s14/device/env.sh
date; pgrep -f "make dumps" >/dev/null && bash dev/device_run.sh wait-dumps
timeout 540 ./build/test_gpu "~[ssd]~[optim]~[layers]" --durations yes 2>&1 | tee $OUT/test_gpu_2.log | tail -4; grep -E "^[0-9.]+ s: " $OUT/test_gpu_2.log | sort -rn | head -8; date
