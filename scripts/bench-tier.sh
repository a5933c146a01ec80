#!/bin/bash
# Tier benchmark: builds bench/tier_bench (Release) if needed, measures the SSD limit with
# fio (before and after the SSD group), runs tier_bench (JSON), and prints each store
# figure next to its limits (the bare io_uring loop and memcpy measured by tier_bench in
# the same run, and fio) with ratios.
#
# Usage: scripts/bench-tier.sh [extra tier_bench flags...]
#   (a --benchmark_filter replaces the groups below with one interleaved run)
# Environment:
#   ATTNSTORE_BENCH_DIR  directory for the SSD files (default /tmp); needs ~13 GiB free
#                        (3 stores and 3 limit files of ~2 GiB each, fio's 2 GiB file)
#   BUILD_DIR            build directory (default <repo>/build-bench)
#   OUT_DIR              results (default $BUILD_DIR/bench-results): fio.txt,
#                        tier_bench.json (both groups merged), tier_bench.log, report.md
#   MIN_TIME             --benchmark_min_time in seconds (default 0.3)
#   REPS                 --benchmark_repetitions (default 5; the table shows medians)
#   SKIP_FIO=1           do not run fio (the fio columns are then empty)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build-bench}
out=${OUT_DIR:-$build/bench-results}
dir=${ATTNSTORE_BENCH_DIR:-/tmp}
min_time=${MIN_TIME:-0.3}
reps=${REPS:-5}
export ATTNSTORE_BENCH_DIR=$dir
mkdir -p "$out"

# ---- build (Release)
if [ ! -f "$build/CMakeCache.txt" ]; then
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S "$root" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
if ! grep -q '^CMAKE_BUILD_TYPE:STRING=Release$' "$build/CMakeCache.txt"; then
  echo "bench-tier: $build is not a Release build; set BUILD_DIR to another directory" >&2
  exit 1
fi
cmake --build "$build" --target tier_bench >/dev/null
bin=$build/bench/tier_bench

# ---- fio limits (same directory, same sitting): run before and after the SSD group
fio_limits() {  # $1: output file
  : >"$1"
  [ "${SKIP_FIO:-0}" = 1 ] && return 0
  local fio_script=$root/../shared/scripts/fio-limits.sh
  if [ -f "$fio_script" ]; then
    echo "== fio: $fio_script $dir" >&2
    bash "$fio_script" "$dir" | tee "$1" >&2
  elif command -v fio >/dev/null; then
    echo "== fio (direct): io_uring, O_DIRECT, QD 32, 2 GiB file in $dir" >&2
    local f="$dir/fio-limits.$$" bs rw extra bps
    for bs in 1M 256k; do
      for rw in write read; do
        extra=""; [ "$rw" = write ] && extra="--end_fsync=1"
        bps=$(fio --name=lim --filename="$f" --size=2G --direct=1 --ioengine=io_uring --rw=$rw \
          --bs=$bs --iodepth=32 $extra --output-format=json 2>/dev/null |
          python3 -c "import json,sys; print(json.load(sys.stdin)['jobs'][0]['$rw']['bw_bytes'])")
        printf 'fio io_uring O_DIRECT %-5s bs=%-4s qd=32: %6.2f GB/s\n' "$rw" "$bs" \
          "$(python3 -c "print($bps/1e9)")" | tee -a "$1" >&2
      done
    done
    rm -f "$f"
  else
    echo "bench-tier: fio not found; fio columns left empty" >&2
  fi
}

# ---- tier_bench: several invocations, merged into one JSON file.
# Every store figure is sampled in the same time windows as its limit: repetitions are
# randomly interleaved (the shared disk drifts by 2x within seconds, and other jobs on
# the 2 cores move the DRAM figures too). SSD group: all SSD benchmarks in one run. DRAM
# group: one run per block size (each keeps its two stores in memory), then lookup.
common=(--benchmark_format=json "--benchmark_min_time=$min_time" "--benchmark_repetitions=$reps"
  --benchmark_enable_random_interleaving=true)
run_bench() {  # $1: json file, then the command
  local json=$1
  shift
  echo "== ATTNSTORE_BENCH_DIR=$dir $*" >&2
  cmds+=("$*")
  jsons+=("$json")
  "$@" >"$json" 2>>"$out/tier_bench.log" || {
    echo "bench-tier: tier_bench failed; see $out/tier_bench.log" >&2
    tail -20 "$out/tier_bench.log" >&2
    exit 1
  }
}
: >"$out/tier_bench.log"
rm -f "$out"/tier_bench.*.json
cmds=()
jsons=()
user_filter=0
for a in "$@"; do [[ $a == --benchmark_filter=* ]] && user_filter=1; done
fio_limits "$out/fio.txt"
if [ $user_filter = 1 ]; then  # the caller's filter replaces the groups: one invocation
  run_bench "$out/tier_bench.user.json" "$bin" "${common[@]}" "$@"
  fio_limits "$out/fio-after.txt"
else
  run_bench "$out/tier_bench.ssd.json" "$bin" "${common[@]}" '--benchmark_filter=^BM_(Ssd|Uring)' "$@"
  fio_limits "$out/fio-after.txt"
  for kib in 4096 1024 256 4; do
    run_bench "$out/tier_bench.dram$kib.json" "$bin" "${common[@]}" \
      "--benchmark_filter=^BM_(Dram[A-Za-z]*|Memcpy)/block_kib:$kib\$" "$@"
  done
  run_bench "$out/tier_bench.lookup.json" "$bin" "${common[@]}" '--benchmark_filter=^BM_Lookup' "$@"
fi
python3 -c '
import json, sys
merged = None
for p in sys.argv[1:]:
    d = json.load(open(p))
    if merged is None:
        merged = d
    else:
        merged["benchmarks"] += d["benchmarks"]
json.dump(merged, sys.stdout, indent=1)
' "${jsons[@]}" >"$out/tier_bench.json"
cmd_text=$(printf '%s\n' "${cmds[@]}")

# ---- table
python3 - "$out/tier_bench.json" "$out/fio.txt" "$out/fio-after.txt" "$cmd_text" <<'EOF' | tee "$out/report.md"
import json, re, sys, statistics

data = json.load(open(sys.argv[1]))
fio_before = open(sys.argv[2]).read().splitlines()
fio_after = open(sys.argv[3]).read().splitlines()
command = sys.argv[4]

runs = {}   # run name -> list of per-repetition entries
med = {}    # run name -> median aggregate (or the single run)
errors = []
for b in data["benchmarks"]:
    name = b.get("run_name", b["name"])
    if b.get("error_occurred"):
        errors.append(f'{b["name"]}: {b.get("error_message")}')
        continue
    if b.get("run_type") == "aggregate":
        if b.get("aggregate_name") == "median":
            med[name] = b
    else:
        runs.setdefault(name, []).append(b)
for name, rs in runs.items():
    med.setdefault(name, rs[0])

def val(name, key):
    b = med.get(name)
    return None if b is None or key not in b else float(b[key])

def spread(name, key):
    rs = runs.get(name, [])
    v = [float(r[key]) for r in rs if key in r]
    return (min(v), max(v)) if len(v) > 1 else None

def parse_fio(lines):
    r = {}
    for line in lines:
        m = re.search(r"(write|read)\s+bs=(\S+)\s+qd=\d+:\s+([\d.]+) GB/s", line)
        if m:
            kib = {"1M": 1024, "256k": 256, "64k": 64}.get(m.group(2))
            r[(m.group(1), kib)] = float(m.group(3)) * 1e9
    return r

# fio ran before and after the SSD group: the limit is their mean (both are shown).
fio_b, fio_a = parse_fio(fio_before), parse_fio(fio_after)
fio, fio_text = {}, {}
for k in set(fio_b) | set(fio_a):
    v = [d[k] for d in (fio_b, fio_a) if k in d]
    fio[k] = sum(v) / len(v)
    fio_text[k] = f"{fio[k] / 1e9:.2f}" + (f" ({v[0] / 1e9:.2f}/{v[1] / 1e9:.2f})" if len(v) == 2 else "")

def gbs(x): return "-" if x is None else f"{x / 1e9:.2f}"
def ratio(a, b): return None if a is None or b is None or b == 0 else a / b
def r2(x): return "-" if x is None else f"{x:.2f}"
def with_spread(name, key="bytes_per_second"):
    v = val(name, key)
    s = spread(name, key)
    return gbs(v) + (f" ({s[0] / 1e9:.2f}-{s[1] / 1e9:.2f})" if s else "")

print("Commands (ATTNSTORE_BENCH_DIR=" + data["context"].get("attnstore_bench_dir", "?").rsplit("/", 1)[0] + "):\n")
for c in command.splitlines():
    print("    " + c)
print()
print(f"Date: {data['context'].get('date', '?')}; hash kernel {data['context'].get('attnstore_hash_kernel', '?')}; "
      f"figures are medians of the repetitions (min-max in brackets); GB/s = 1e9 B/s.\n")

print("### SSD tier (QD 32, wall time; store: payload bytes; io_uring loop: transfer bytes = block + 4 KiB)\n")
print("| figure | store GB/s | io_uring loop GB/s | store/loop | fio GB/s (before/after) | store/fio | target (of fio) | met |")
print("|---|---|---|---|---|---|---|---|")
targets = {1024: 0.90, 256: 0.85}
for kib in (1024, 256, 64):
    for fig, op, limit in (("BM_SsdWrite", "write", "BM_UringLimitWrite"),
                           ("BM_SsdRead", "read", "BM_UringLimitRead"),
                           ("BM_SsdReadPromote", "read", "BM_UringLimitRead")):
        n = f"{fig}/block_kib:{kib}/qd:32"
        ln = f"{limit}/block_kib:{kib}/qd:32"
        if n not in med:
            continue
        s, l, f = val(n, "bytes_per_second"), val(ln, "bytes_per_second"), fio.get((op, kib))
        t = targets.get(kib)
        rf = ratio(s, f)
        met = "-" if t is None or rf is None else ("yes" if rf >= t else "no")
        print(f"| {n} | {with_spread(n)} | {with_spread(ln)} | {r2(ratio(s, l))} | {fio_text.get((op, kib), '-')} | {r2(rf)} | "
              f"{'-' if t is None else f'>= {t:.2f}'} | {met} |")

print("\n### DRAM tier (payload bytes, thread CPU time; limit: memcpy of the same blocks, one thread)\n")
print("| figure | store GB/s | memcpy GB/s | store/memcpy | target | met | store us/block | store - memcpy us/block |")
print("|---|---|---|---|---|---|---|---|")
overhead = []
for kib in (4096, 1024, 256, 4):
    mn = f"BM_Memcpy/block_kib:{kib}"
    for fig in ("BM_DramPut", "BM_DramGet", "BM_DramGetNoVerify"):
        n = f"{fig}/block_kib:{kib}"
        if n not in med:
            continue
        s, l = val(n, "bytes_per_second"), val(mn, "bytes_per_second")
        r = ratio(s, l)
        t = 0.90 if kib >= 256 else None
        met = "-" if t is None or r is None else ("yes" if r >= t else "no")
        spb, mpb = val(n, "sec_per_block"), val(mn, "sec_per_block")
        ov = None if spb is None or mpb is None else (spb - mpb) * 1e6
        if kib == 4 and ov is not None:
            overhead.append((fig, ov))
        print(f"| {n} | {with_spread(n)} | {with_spread(mn)} | {r2(r)} | {'-' if t is None else '>= 0.90'} | {met} | "
              f"{'-' if spb is None else f'{spb * 1e6:.2f}'} | {'-' if ov is None else f'{ov:.2f}'} |")
if overhead:
    print("\nPer-block overhead beyond the copy (4 KiB blocks, store - memcpy per block; target < 2 us): " +
          ", ".join(f"{f} {o:.2f} us ({'met' if o < 2 else 'not met'})" for f, o in overhead) + ".")

print("\n### Lookup (8192-token prompt, 256 tokens per block: 32 blocks in DRAM)\n")
print("| figure | us per lookup (CPU) | target | met |")
print("|---|---|---|---|")
scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
for n in ("BM_Lookup", "BM_LookupCold"):
    b = med.get(n)
    if not b:
        continue
    us = float(b["cpu_time"]) * scale[b.get("time_unit", "ns")]  # CPU time (see tier_bench.cpp)
    print(f"| {n} | {us:.2f} | < 10 | {'yes' if us < 10 else 'no'} |")

for label, lines in (("before", fio_before), ("after", fio_after)):
    if lines:
        print(f"\nfio {label} the SSD group (2 GiB file, io_uring, O_DIRECT, QD 32; writes with --end_fsync=1):\n")
        for line in lines:
            print("    " + line)
if errors:
    print("\nErrors:")
    for e in errors:
        print("  " + e)
    sys.exit(1)
EOF
