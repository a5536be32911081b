#!/usr/bin/env bash
# Kernels that spill registers to local memory, from ptxas's report (no GPU needed): a spill in a hot loop costs
# local-memory traffic that no profile of the source shows. Compiles each file (default: train_mamba.cu, which
# holds every kernel of a step, and the benchmarks) for sm_90a, the Makefile's default, and prints one line per
# kernel with spill stores or loads, demangled.
#   usage: bash dev/spills.sh [FILE.cu ...]
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(train_mamba.cu dev/bench_*.cu)
mpi_inc=$(mpicxx --showme:incdirs 2>/dev/null | tr ' ' '\n' | sed '/^$/d; s/^/-I/' | tr '\n' ' ')
for f in "${files[@]}"; do
  # ptxas prints, per kernel: "Compiling entry function 'NAME'", then "N bytes stack frame, S bytes spill
  # stores, L bytes spill loads"
  "$NVCC" -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I. $mpi_inc --expt-relaxed-constexpr \
    --extended-lambda -Xptxas -v -c "$f" -o /dev/null 2>&1 |
    awk -v file="$f" '
      /Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); name = substr($0, RSTART + 1, RLENGTH - 2) }
      /bytes spill stores/ && name != "" {
        if ($5 + $9 > 0) printf "%s\t%s\t%d bytes spill stores, %d bytes spill loads\n", file, name, $5, $9
        name = ""
      }' | while IFS=$'\t' read -r file name what; do
      printf '%s: %s: %s\n' "$file" "$(echo "$name" | c++filt | cut -c1-160)" "$what"
    done
done
