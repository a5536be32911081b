#!/usr/bin/env bash
# call 3 (~8 min): the rest of test_gpu (the models against the dumps, ZeRO and graphs with --tune-matmuls)
set -uo pipefail; source wip_s14/device/env.sh
date; timeout 540 ./build/test_gpu "~[ssd]~[optim]~[layers]" 2>&1 | tee $OUT/test_gpu_2.log | tail -8; date
