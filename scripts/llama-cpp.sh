#!/usr/bin/env bash
# Fetches llama.cpp (as vendored in the llama-cpp-python sdist on PyPI, pinned by hash),
# builds it CPU-only as static libraries and installs it into a cache outside the tree,
# keyed by the sdist hash and the compiler, so a second run costs seconds. Prints the
# install prefix on its last line; CMake takes it as -DATTNSTORE_LLAMA_CPP_DIR=<prefix>.
#
#   scripts/llama-cpp.sh               fetch and build (if not cached), print the prefix
#   scripts/llama-cpp.sh --demo [ARGS] also build attnstore with the adapter and run
#                                      examples/llama_chat with ARGS (--help lists them)
#
# The cache is $ATTNSTORE_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/attnstore).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

# The pin: llama-cpp-python 0.3.36 vendors llama.cpp at commit 0c1e570.
version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
llama_commit=0c1e570

cache=${ATTNSTORE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/attnstore}
compiler=$( (c++ --version | head -1; cmake --version | head -1) | sha256sum | cut -c1-12)
prefix="$cache/llama.cpp/${sha256:0:16}-$compiler"
jobs=$(nproc)

build_llama() {
  [ -f "$prefix/.complete" ] && return 0
  "$root/scripts/deps.sh"
  python3 -m pip --version >/dev/null 2>&1 || "$root/scripts/deps.sh" python3-pip
  mkdir -p "$cache/downloads"
  local sdist="$cache/downloads/llama_cpp_python-$version.tar.gz"
  if ! echo "$sha256  $sdist" | sha256sum -c --status 2>/dev/null; then
    echo "attnstore: fetching llama-cpp-python $version (sdist, pinned by sha256)" >&2
    local req; req=$(mktemp)
    echo "llama-cpp-python==$version --hash=sha256:$sha256" >"$req"
    python3 -m pip download --quiet --no-deps --no-binary :all: --require-hashes -r "$req" -d "$cache/downloads" >&2
    rm -f "$req"
    echo "$sha256  $sdist" | sha256sum -c --status  # pip checked it too; refuse anything else
  fi
  local work; work=$(mktemp -d "$cache/llama.cpp/build.XXXXXX" 2>/dev/null || { mkdir -p "$cache/llama.cpp"; mktemp -d "$cache/llama.cpp/build.XXXXXX"; })
  trap 'rm -rf "$work"' RETURN
  echo "attnstore: building llama.cpp $llama_commit (CPU, static) into $prefix" >&2
  tar -xzf "$sdist" -C "$work" "llama_cpp_python-$version/vendor/llama.cpp"
  local src="$work/llama_cpp_python-$version/vendor/llama.cpp"
  cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$prefix" \
    -DCMAKE_POSITION_INDEPENDENT_CODE=ON -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_COMMON=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMIT="$llama_commit" -DLLAMA_BUILD_NUMBER=0 >&2
  cmake --build "$work/build" -j "$jobs" --target llama >&2
  rm -rf "$prefix"
  cmake --install "$work/build" >&2
  echo "llama-cpp-python==$version sha256=$sha256 commit=$llama_commit" >"$prefix/.complete"
}

build_llama
if [ "${1:-}" = "--demo" ]; then
  shift
  cmake -S "$root" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DATTNSTORE_LLAMA_CPP_DIR="$prefix" >/dev/null
  cmake --build "$root/build" --target llama_chat
  "$root/build/examples/llama_chat/llama_chat" "$@"
  exit
fi
echo "$prefix"
