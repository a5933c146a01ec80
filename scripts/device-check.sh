#!/bin/bash
# Runs on the lent GPU machine, from the repository root, what scripts/device-build.sh
# built here (carried: build-device/bin and build-device/lib). Each binary runs directly
# (ctest files hold this machine's paths) under its own timeout; a failure does not
# stop the rest, but the script exits 1 when any step failed. Worst case (every
# timeout hit) 6 minutes; normally about 2.
#
# Writes to $OUT (default /tmp/attnstore-device-out), 7 files:
#   env.txt            nvidia-smi, PCIe link, ulimit -l, OS, libraries resolved
#   tests.log          test_cuda_probe, test_cuda_rope, test_cuda_pipeline ("FAILED:"
#                      lines name each failed check), then test_cuda_pipeline and
#                      test_cuda_rope under compute-sanitizer memcheck
#   pipeline_cuda.log  pipeline_bench --backend cuda: console table; the limits line
#                      (peak H2D/D2H, direct, backend) comes first, on stderr
#   pipeline_cuda.json the same, Google Benchmark JSON (limits in "context")
#   rope_cuda.log      rope_bench --backend cuda: console table
#   rope_cuda.json     the same, JSON
#   summary.txt        one line per step: exit code, seconds; then every FAILED or
#                      WARNING line of the logs
set -u

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${OUT:-/tmp/attnstore-device-out}
mkdir -p "$out"
bin=$root/build-device/bin
lib=$root/build-device/lib
export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$PATH:/usr/local/cuda/bin  # compute-sanitizer
# The SSD-tier test wants a real file system (O_DIRECT, io_uring), not a tmpfs.
export ATTNSTORE_TEST_TMP=${ATTNSTORE_TEST_TMP:-/var/tmp/attnstore-device-test}
mkdir -p "$ATTNSTORE_TEST_TMP"
summary=$out/summary.txt
: >"$summary"

{
  echo "== date"
  date -u
  echo "== nvidia-smi"
  nvidia-smi
  echo "== PCIe link"
  nvidia-smi -q | sed -n '/GPU Link Info/,/Replays Since Reset/p'
  echo "== ulimit -l: $(ulimit -l)"
  echo "== uname: $(uname -a)"
  head -2 /etc/os-release
  echo "== cpu: $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo)"
  free -g
  df -h "$ATTNSTORE_TEST_TMP"
  echo "== libraries"
  ldd "$bin/pipeline_bench"
  # The image's libstdc++ must know what these binaries were built against; if it does
  # not, the carried one is used.
  if ldd "$bin"/* 2>&1 | grep -q 'not found'; then
    echo "missing symbols or libraries: using build-device/lib/fallback"
    ldd "$bin"/* 2>&1 | grep 'not found' | sort -u
    export LD_LIBRARY_PATH=$lib:$lib/fallback
  fi
} >"$out/env.txt" 2>&1  # a group, not a subshell: the export above stays

# step NAME LIMIT LOG COMMAND...: runs COMMAND under `timeout`, appending to LOG; a
# step that does not exit 0 makes the script exit 1 at the end (after the summary).
failed=0
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name: $*" >>"$log"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  [ "$rc" = 0 ] || failed=1
  local note=""
  [ "$rc" = 124 ] && note=" (timed out after ${limit}s)"
  echo "== $name: exit $rc after $((SECONDS - t0)) s$note" >>"$log"
  printf '%-28s exit %3s  %4s s%s\n' "$name" "$rc" "$((SECONDS - t0))" "$note" >>"$summary"
}

tests=$out/tests.log
: >"$tests"
step test_cuda_probe 30 "$tests" "$bin/test_cuda_probe"
step test_cuda_rope 30 "$tests" "$bin/test_cuda_rope"
step test_cuda_pipeline 60 "$tests" "$bin/test_cuda_pipeline"

step pipeline_bench 120 "$out/pipeline_cuda.log" "$bin/pipeline_bench" --backend cuda \
  --benchmark_out="$out/pipeline_cuda.json" --benchmark_out_format=json --benchmark_counters_tabular=true
step rope_bench 45 "$out/rope_cuda.log" "$bin/rope_bench" --backend cuda \
  --benchmark_out="$out/rope_cuda.json" --benchmark_out_format=json

# Out-of-bounds or misaligned accesses by the kernels and copies (slow: last).
if command -v compute-sanitizer >/dev/null; then
  step sanitize_pipeline 45 "$tests" compute-sanitizer --tool memcheck --error-exitcode 3 "$bin/test_cuda_pipeline"
  step sanitize_rope 30 "$tests" compute-sanitizer --tool memcheck --error-exitcode 3 "$bin/test_cuda_rope"
else
  echo "compute-sanitizer not found: memcheck skipped" >>"$summary"
fi

{
  echo "== FAILED / WARNING lines"
  grep -h -E 'FAILED|WARNING|ERROR|error:' "$out"/*.log | grep -v '^== ' | head -50
  echo "== files: $(cd "$out" && ls | tr '\n' ' ')"
} >>"$summary"
cat "$summary"
exit "$failed"
