#!/usr/bin/env bash
# One command for a new user: install dependencies, build (Release), run the demo on
# its embedded default configuration: the mini engine (a small Llama on the CPU) serving
# multi-turn conversations with attnstore off, with reuse from DRAM and from SSD.
# Arguments go to the demo (--help lists them).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/deps.sh"
cmake -S "$root" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$root/build" --target mini_engine
"$root/build/examples/mini_engine" "$@"
