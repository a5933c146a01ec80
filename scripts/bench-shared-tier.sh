#!/bin/bash
# Shared tier benchmark (issue 15): starts a local Redis Cluster (scripts/redis-cluster.sh,
# proto-max-bulk-len sized for the values), measures GET and SET of 1 MiB blocks through
# shared_tier (bench/micro/shared_tier_bench.cpp: the real code path, verification
# included) and through the bare cluster client, then redis-benchmark (Debian's
# redis-tools: the server's limit) with the same value size and pipelining against the
# same cluster in the same run, prints the ratios and stops the cluster.
#
# The last line is one JSON object:
#   {"get_ratio": x, "set_ratio": y, "e2e": {...}, ...}
# get_ratio and set_ratio: shared_tier values/s over redis-benchmark requests/s (medians);
# get_ratio_per_run and set_ratio_per_run: each run over the redis-benchmark run after it. The e2e
# figures come from bench/e2e/e2e_bench --nodes 3 --redis on the same cluster: the mini engine's
# conversations with every turn recomputed, on one node from DRAM, and round-robin over 3
# nodes with local tiers only and with the shared tier (median TTFT of the turns with >= 2K
# history tokens; docs/benchmarks.md, "Several nodes on a shared tier").
#
# Usage: scripts/bench-shared-tier.sh
# Environment:
#   BUILD_DIR    Release build directory (default <repo>/build-bench)
#   PORT_BASE    first port of the cluster (default 7300; nodes use 3 ports and those +10000)
#   BLOCKS       distinct blocks written per phase (default 1280: 1.26 GiB of records)
#   BATCH        values per pipelined batch (default 48: ~16 per master)
#   MAXMEMORY    per node (default 2gb)
#   REPS         runs of each side, alternating; the medians are reported (default 3)
#   OUT_DIR      results (default $BUILD_DIR/bench-results): shared_tier.log (the bench's
#                report), shared_tier.jsonl (its JSON lines), redis_benchmark.csv
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build-bench}
port=${PORT_BASE:-7300}
blocks=${BLOCKS:-1280}
batch=${BATCH:-48}
maxmemory=${MAXMEMORY:-2gb}
reps=${REPS:-3}
out=${OUT_DIR:-$build/bench-results}
mkdir -p "$out"
for tool in redis-server redis-cli redis-benchmark python3; do
  command -v $tool >/dev/null || { echo "bench-shared-tier: $tool not found (scripts/deps.sh)" >&2; exit 77; }
done

# ---- build (Release)
if [ ! -f "$build/CMakeCache.txt" ]; then
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S "$root" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
if ! grep -q '^CMAKE_BUILD_TYPE:STRING=Release$' "$build/CMakeCache.txt"; then
  echo "bench-shared-tier: $build is not a Release build; set BUILD_DIR to another directory" >&2
  exit 1
fi
cmake --build "$build" --target shared_tier_bench e2e_bench >/dev/null
bin=$build/bench/shared_tier_bench

# ---- the cluster: 3 masters on loopback, values of 1 MiB + 4 KiB
dir=${TMPDIR:-/tmp}/attnstore-bench-redis-$(id -u)-$port
cluster() { "$root/scripts/redis-cluster.sh" "$@" --port-base "$port" --dir "$dir"; }
cluster start --masters 3 --maxmemory "$maxmemory" --bulk-len 16mb >/dev/null
trap 'cluster stop >/dev/null 2>&1 || true' EXIT
flushall() { redis-cli -p "$port" --cluster call "127.0.0.1:$port" FLUSHALL >/dev/null 2>&1; }

# redis-benchmark: one connection per master (-c 3), each with `per_node` requests in its
# pipeline: the same depth as a shared_tier batch spread over 3 masters. Keys: random
# among `keyspace` per node (-r), `requests` in all, so GET finds nearly every key SET wrote.
per_node=$(( (batch + 2) / 3 ))
requests=$((blocks * 2))
keyspace=$((blocks / 3))

{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(uname -n) $(nproc) cores; redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')"
  echo "# shared_tier_bench --blocks $blocks --batch $batch; redis-benchmark --cluster -c 3 -P $per_node -n $requests -r $keyspace"
} >"$out/shared_tier.log"
: >"$out/shared_tier.jsonl"
: >"$out/redis_benchmark.csv"
for ((r = 1; r <= reps; r++)); do
  flushall
  echo "== run $r/$reps: shared_tier_bench" >&2
  "$bin" --seed "127.0.0.1:$port" --blocks "$blocks" --batch "$batch" --json 2>>"$out/shared_tier.log" |
    tail -1 >>"$out/shared_tier.jsonl"
  tail -6 "$out/shared_tier.log" >&2
  # redis-benchmark values: the size of a block record, as shared_tier_bench reported it
  record_bytes=$(tail -1 "$out/shared_tier.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["record_bytes"])')
  flushall
  echo "== run $r/$reps: redis-benchmark SET, GET" >&2
  redis-benchmark --cluster -h 127.0.0.1 -p "$port" -t set,get -d "$record_bytes" -P "$per_node" -c 3 \
    -n "$requests" -r "$keyspace" --csv 2>&1 | grep -E '^"(SET|GET)"' | tee -a "$out/redis_benchmark.csv" >&2
done
flushall

# ---- end to end: 3 mini-engine nodes, round-robin, on this cluster
echo "== e2e_bench --nodes 3 (recompute, store-dram, nodes-local, nodes-shared)" >&2
"$build/bench/e2e_bench" --nodes 3 --redis "127.0.0.1:$port" --json 2>>"$out/e2e.log" | tee -a "$out/e2e.log" |
  tail -1 >"$out/e2e.json"
flushall

python3 - "$out/shared_tier.jsonl" "$out/redis_benchmark.csv" "$reps" "$out/e2e.json" <<'EOF'
import json, statistics, sys
tier = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
e2e = json.load(open(sys.argv[4]))
rb = {"SET": [], "GET": []}
for line in open(sys.argv[2]).read().splitlines():
    f = [x.strip('"') for x in line.split(",")]
    rb[f[0]].append(float(f[1]))
med = lambda xs: statistics.median(xs) if xs else None
t = {k: med([x[k] for x in tier]) for k in tier[0] if k.endswith("_per_s") or k.endswith("_gbps")}
failures = sum(x["failures"] for x in tier)
b_set, b_get = med(rb["SET"]), med(rb["GET"])
ratio = lambda a, b: round(a / b, 3) if a and b else None
out = {
    "get_ratio": ratio(t["tier_get_per_s"], b_get),
    "set_ratio": ratio(t["tier_set_per_s"], b_set),
    "e2e": {"ttft_recompute_ms": e2e["ttft_recompute_ms"], "ttft_shared_ms": e2e["ttft_nodes_shared_ms"],
            "ttft_local_only_ms": e2e["ttft_nodes_local_ms"], "ttft_single_node_dram_ms": e2e["ttft_reuse_dram_ms"],
            "shared_over_single_node": ratio(e2e["ttft_nodes_shared_ms"], e2e["ttft_reuse_dram_ms"]),
            "outputs_identical": e2e["outputs_identical"]},
    "record_bytes": tier[0]["record_bytes"], "blocks": tier[0]["blocks"], "batch": tier[0]["batch"],
    "runs": len(tier),
    "shared_tier": {k: round(v, 3) for k, v in t.items()},
    "redis_benchmark": {"set_per_s": b_set, "get_per_s": b_get},
    # each run's shared_tier against the redis-benchmark run right after it: on a shared
    # machine the load drifts between runs, less within one
    "get_ratio_per_run": [ratio(x["tier_get_per_s"], g) for x, g in zip(tier, rb["GET"])],
    "set_ratio_per_run": [ratio(x["tier_set_per_s"], g) for x, g in zip(tier, rb["SET"])],
    "raw_client_get_ratio": ratio(t["raw_get_per_s"], b_get),
    "raw_client_set_ratio": ratio(t["raw_set_per_s"], b_set),
    "failures": failures,
}
print(f"shared_tier  GET {t['tier_get_per_s']:8.1f}/s  SET {t['tier_set_per_s']:8.1f}/s  (median of {len(tier)})", file=sys.stderr)
print(f"raw client   GET {t['raw_get_per_s']:8.1f}/s  SET {t['raw_set_per_s']:8.1f}/s", file=sys.stderr)
print(f"redis-bench  GET {b_get:8.1f}/s  SET {b_set:8.1f}/s", file=sys.stderr)
print(f"e2e TTFT     recompute {e2e['ttft_recompute_ms']:.1f} ms, one node DRAM {e2e['ttft_reuse_dram_ms']:.1f} ms, "
      f"3 nodes local {e2e['ttft_nodes_local_ms']:.1f} ms, 3 nodes shared {e2e['ttft_nodes_shared_ms']:.1f} ms", file=sys.stderr)
print(json.dumps(out))
sys.exit(1 if failures or not e2e["outputs_identical"] else 0)
EOF
