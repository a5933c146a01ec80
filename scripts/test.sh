#!/usr/bin/env bash
# Runs the whole test suite: builds Release and runs every ctest test (unit, store,
# crash recovery, stress, install-and-consume, and attnstore behind llama.cpp, which
# scripts/llama-cpp.sh fetches pinned and builds into a cache), then the same tests
# under ASan+UBSan and the concurrent ones under TSan.
#
#   scripts/test.sh            everything (what CI runs)
#   scripts/test.sh release    only the Release build's tests
#   scripts/test.sh asan|tsan  only that sanitizer build
# ATTNSTORE_CRASH_KILLS=N and ATTNSTORE_STRESS_SCALE=N lengthen the crash and stress
# tests (soak); the defaults keep the whole run well under 20 minutes on 2 cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-all}
"$root/scripts/deps.sh"
jobs=$(nproc)

run_suite() {  # name, build dir, ctest selection, cmake args...
  local name=$1 dir=$2 select=$3
  shift 3
  echo "=== attnstore tests: $name"
  cmake -S "$root" -B "$dir" -G Ninja "$@" >/dev/null
  cmake --build "$dir" -j "$jobs"
  (cd "$dir" && ctest --output-on-failure --no-tests=error -j "$jobs" $select)
}

case $what in
  all|release) llama_dir=$("$root/scripts/llama-cpp.sh")  # fails the run if llama.cpp cannot be built
    run_suite release "$root/build" "" -DCMAKE_BUILD_TYPE=Release -DATTNSTORE_LLAMA_CPP_DIR="${llama_dir##*$'\n'}" ;;&
  all|asan) run_suite "asan+ubsan" "$root/build-asan" "-L unit|crash|stress" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DATTNSTORE_SANITIZE=address -DATTNSTORE_BUILD_BENCH=OFF -DATTNSTORE_BUILD_EXAMPLES=OFF ;;&
  all|tsan) run_suite tsan "$root/build-tsan" "-L stress|concurrency" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DATTNSTORE_SANITIZE=thread -DATTNSTORE_CUDA=OFF -DATTNSTORE_BUILD_BENCH=OFF -DATTNSTORE_BUILD_EXAMPLES=OFF ;;
  all|release|asan) ;;
  *) echo "usage: $0 [all|release|asan|tsan]" >&2; exit 2 ;;
esac
