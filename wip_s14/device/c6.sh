#!/usr/bin/env bash
# the warm machine after c5.sh: the rest of test_gpu (the models against the dumps, ZeRO, graphs)
set -uo pipefail; source wip_s14/device/env.sh
date; dumps_ready 200 && test_part test_gpu_2 "$MODEL_TESTS" 540; date
