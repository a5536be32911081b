#!/usr/bin/env bash
# the tests first, in one call on a fresh machine (for when device time is short): the dumps in the background,
# the kernel tests beside them, then the model tests in whatever of the 585 s is left (what does not finish:
# c6.sh on the same machine)
set -uo pipefail; source wip_s14/device/env.sh
date; unpack; bash dev/device_run.sh dumps
test_part test_gpu_1 "$KERNEL_TESTS" 240
date; dumps_ready 200 || exit 1
left=$((585 - SECONDS))
[ $left -ge 60 ] || { echo "only $left s left: run c6.sh for the model tests"; exit 1; }
echo "the model tests get $left s"; test_part test_gpu_2 "$MODEL_TESTS" $left; date
