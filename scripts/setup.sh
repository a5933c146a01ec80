#!/usr/bin/env bash
# One command for a new user: install dependencies, build (Release), run the demo on
# its embedded default configuration.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/deps.sh"
cmake -S "$root" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$root/build" --target store_demo
"$root/build/examples/store_demo" "$@"
