#!/usr/bin/env bash
# Runs one libFuzzer harness of tests/fuzz for a while.
#
#   scripts/fuzz.sh NAME SECONDS [--merge]
#     NAME     trace_import | safetensors | store_dir | manifest  (tests/fuzz/fuzz_NAME.cpp)
#     SECONDS  how long to fuzz (libFuzzer -max_total_time); 0 with --merge: only merge
#              the scratch corpus of earlier runs
#     --merge  afterwards, add the inputs that reach new code to the committed corpus
#              tests/fuzz/corpus/NAME (libFuzzer -set_cover_merge over edges, inputs
#              cut to 2 KiB, so it stays small; review and commit what it adds)
#
# Builds build-fuzz/ with clang (-DATTNSTORE_BUILD_FUZZERS=ON: libFuzzer, ASan, UBSan),
# fuzzes with a scratch corpus build-fuzz/corpus/NAME seeded from the committed one,
# and writes findings (crash-*, leak-*, timeout-*, oom-*) to build-fuzz/findings/NAME/.
# Prints executions, exec/s and findings; exits 1 when there is a finding. Long runs:
# run it under nice (scripts/fuzz.sh already lowers the fuzzer's priority by 10).
# Environment: FUZZ_JOBS (build jobs, default nproc), FUZZ_ARGS (more libFuzzer flags).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
usage() { echo "usage: $0 trace_import|safetensors|store_dir|manifest SECONDS [--merge]" >&2; exit 2; }
[ $# -ge 2 ] || usage
name=$1 seconds=$2 merge=0
[ "${3:-}" = "--merge" ] && merge=1
[ $# -le 3 ] || usage
[ -f "$root/tests/fuzz/fuzz_$name.cpp" ] || { echo "fuzz.sh: no harness tests/fuzz/fuzz_$name.cpp" >&2; usage; }
[[ "$seconds" =~ ^[0-9]+$ ]] || usage

# clang with libFuzzer's runtime: only fuzzing needs them, so they are not core deps.
have_libfuzzer() {
  command -v clang++ >/dev/null &&
    echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' |
      clang++ -x c++ - -fsanitize=fuzzer -o /dev/null 2>/dev/null
}
if ! have_libfuzzer; then
  "$root/scripts/deps.sh" clang libclang-rt-14-dev
  have_libfuzzer || { echo "fuzz.sh: clang++ -fsanitize=fuzzer does not link" >&2; exit 1; }
fi

build=$root/build-fuzz
CXX=clang++ cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DATTNSTORE_BUILD_FUZZERS=ON \
  -DATTNSTORE_CUDA=OFF -DATTNSTORE_BUILD_BENCH=OFF -DATTNSTORE_BUILD_EXAMPLES=OFF >/dev/null
nice cmake --build "$build" --target "fuzz_$name" -j "${FUZZ_JOBS:-$(nproc)}"

seeds=$root/tests/fuzz/corpus/$name
corpus=$build/corpus/$name
findings=$build/findings/$name
logs=$build/logs
mkdir -p "$corpus" "$findings" "$logs" "$seeds" "$build/tmp"
log=$logs/$name-$(date +%Y%m%d-%H%M%S).log
dict=()
[ -f "$root/tests/fuzz/$name.dict" ] && dict=(-dict="$root/tests/fuzz/$name.dict")
# Stacks for UBSan reports too (ASan prints them anyway).
export UBSAN_OPTIONS=print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}
marker=$build/.fuzz-start-$name
touch "$marker"

if [ "$seconds" -gt 0 ]; then
  echo "=== fuzz_$name for ${seconds}s (log: $log)"
  set +e
  # New inputs go to the scratch corpus (the first directory); the committed one only seeds.
  # -timeout: an input that runs 10 s is a hang. -rss_limit_mb: also the malloc limit,
  # so one allocation far out of proportion to a small input is an oom finding.
  ATTNSTORE_TEST_TMP=$build/tmp nice -n 10 "$build/tests/fuzz_$name" -max_total_time="$seconds" -timeout=10 \
    -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$findings/" "${dict[@]}" ${FUZZ_ARGS:-} \
    "$corpus" "$seeds" >"$log" 2>&1
  rc=$?
  set -e

  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$' || true)
  rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$' || true)
  if [ -z "$runs" ]; then  # a crash may end the run before the final stats: the last status line
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    runs=$(echo "$last" | grep -oE '^#[0-9]+' | tr -d '#' || true)
    rate=$(echo "$last" | grep -oE 'exec/s: [0-9]+' | grep -oE '[0-9]+' || true)
  fi
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
  echo "executions: ${runs:-?}  exec/s: ${rate:-?}  ${cov}  corpus: $(find "$corpus" -type f | wc -l) files"
  new_findings=$(find "$findings" -type f -newer "$marker")
  if [ "$rc" -ne 0 ] || [ -n "$new_findings" ]; then
    echo "FINDING (libFuzzer exit $rc):"
    grep -E '^==[0-9]+==ERROR|SUMMARY:|invariant broken|runtime error|Test unit written to' "$log" | head -20 || true
    for f in $new_findings; do echo "  $f ($(stat -c %s "$f") bytes): reproduce with $build/tests/fuzz_$name $f"; done
    echo "stack and details: $log"
    exit 1
  fi
  echo "findings: none"
else
  : >"$log"  # 0 seconds: no fuzzing, only the merge of the scratch corpus
fi

if [ "$merge" -eq 1 ]; then
  n0=$(find "$seeds" -type f | wc -l)
  # Set cover over edges (-use_counters=0: hit counts would make every loop length a
  # new feature), inputs cut to 2 KiB: the fewest, smallest files that reach the new
  # code. The committed files all stay (regressions among them).
  ATTNSTORE_TEST_TMP=$build/tmp nice -n 10 "$build/tests/fuzz_$name" -set_cover_merge=1 -use_counters=0 \
    -max_len=2048 -timeout=10 -rss_limit_mb=2048 "$seeds" "$corpus" >>"$log" 2>&1
  n1=$(find "$seeds" -type f | wc -l)
  echo "merged: tests/fuzz/corpus/$name $n0 -> $n1 files ($(du -sk --apparent-size "$seeds" | cut -f1) KiB)"
  [ "$n1" -gt 100 ] && echo "note: the committed corpus is past 100 files; keep it small (prune before committing)"
fi
exit 0
