#!/usr/bin/env bash
# Installs what the build and the tests need and are missing (make train, make test and make
# test-gpu run it first). Each need is checked by what it provides (a header the compiler finds,
# a command, a Python module), so a second run installs nothing and stays offline, and a machine
# that has a need met another way (headers on CPATH) is left alone. Missing Debian packages are
# installed with apt-get, through sudo when not root; when neither can, it stops with one line
# naming the packages and the command to run.
# usage: bash dev/setup.sh [build|test]   (test: also what the tests' PyTorch reference needs)
set -uo pipefail
what=${1:-build}
CXX=${CXX:-g++}
PYTHON=${PYTHON:-/usr/bin/python3}
missing=()
has_header() { echo "#include <$1>" | $CXX -E -x c++ - >/dev/null 2>&1; }

has_header catch2/catch.hpp || missing+=(catch2)
has_header nlohmann/json.hpp || missing+=(nlohmann-json3-dev)
has_header unicode/uchar.h || missing+=(libicu-dev)
has_header sentencepiece_processor.h || missing+=(libsentencepiece-dev)
command -v mpicxx >/dev/null && [ -n "$(mpicxx --showme:incdirs 2>/dev/null)" ] || missing+=(libopenmpi-dev)
command -v mpirun >/dev/null || missing+=(openmpi-bin)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ "$what" = test ]; then
  "$PYTHON" -c "import torch" 2>/dev/null || missing+=(python3-torch)
  "$PYTHON" -c "import numpy" 2>/dev/null || missing+=(python3-numpy)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

echo "setup: installing the missing Debian packages: ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  SUDO=sudo
else
  echo "error: missing Debian packages: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
  echo "error: could not install the Debian packages ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
