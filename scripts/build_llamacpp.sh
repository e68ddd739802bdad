#!/usr/bin/env bash
# Build llama.cpp (llama-bench, llama-server, llama-quantize) from the llama-cpp-python sdist's vendored source,
# once, into a cache shared by the tests (dequantization reference) and the benchmarks (peer engine).
# Prints the bin directory. Usage: scripts/build_llamacpp.sh [--print-dir | --check]
#   --print-dir  where the binaries are (or will be); --check  exit 1 unless they are built (builds nothing)
set -euo pipefail
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
ROOT="${TOKENSTREAM_LLAMACPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tokenstream/llama.cpp-$VERSION}"
BIN="$ROOT/build/bin"
TARGETS=(llama-bench llama-server llama-quantize)
PIP="${PIP:-$(dirname "$0")/../.venv/bin/pip}"
[ -x "$PIP" ] || PIP="python3 -m pip"

if [ "${1:-}" = "--print-dir" ]; then echo "$BIN"; exit 0; fi
built() { for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; }
if built; then echo "$BIN"; exit 0; fi
if [ "${1:-}" = "--check" ]; then echo "llama.cpp is not built in $ROOT" >&2; exit 1; fi

mkdir -p "$ROOT"
exec 9>"$ROOT/.lock"
flock 9  # one build at a time; a second caller waits and then finds the binaries
if built; then echo "$BIN"; exit 0; fi

sdist="$ROOT/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  $PIP download -q "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$ROOT" >&2
fi
echo "$SHA256  $sdist" | sha256sum -c --quiet - >&2
echo "llama.cpp $VERSION: building ${TARGETS[*]} into $ROOT (about 10 minutes on 2 cores, once)" >&2
rm -rf "$ROOT/src" && mkdir -p "$ROOT/src"
tar xzf "$sdist" -C "$ROOT/src" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$ROOT/src" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$ROOT/build" --config Release -j "$(nproc)" --target "${TARGETS[@]}" >&2
built
echo "$BIN"
