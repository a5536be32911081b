#!/usr/bin/env bash
# call 4, if the budget allows (~6 min): SDPA and the strong PyTorch stack beside the same build, the default run
set -uo pipefail; source wip_s14/device/env.sh
date; bash dev/device_run.sh wait-anchor-build
(cd anchors && timeout 100 python3 attn_anchor.py) 2>&1 | tee -a $ANCHOR_LOG | grep -E "anchor" | tail -8
bash dev/device_run.sh anchors-strong quick
date; bash dev/device_run.sh default; date
