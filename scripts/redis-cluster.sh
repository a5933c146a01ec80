#!/usr/bin/env bash
# A local Redis Cluster on loopback ports, from Debian's redis-server, for attnstore's
# shared tier (tests, CI, benchmarks). Nothing is persisted: appendonly no, no RDB.
#
#   scripts/redis-cluster.sh start  [options]   start (or find running) and print the seed host:port
#   scripts/redis-cluster.sh status [options]   one line per node; exit 0 only if all are ok
#   scripts/redis-cluster.sh stop   [options]   shut every node down and remove the directory
#   scripts/redis-cluster.sh kill-node --node PORT [options]     SIGKILL one node (a crash; its data is gone)
#   scripts/redis-cluster.sh restart-node --node PORT [options]  start a killed node again from its
#                    config: it rejoins with its old role and slots (unless a replica took them
#                    over: then it comes back as that replica's replica), empty
#
# Options (give stop/status the same --port-base or --dir as start):
#   --masters N      masters (default 3, at least 3)
#   --replicas R     replicas per master, 0 or 1 (default 0)
#   --port-base P    first port (default 7100); node i listens on P+i and P+i+10000 (bus)
#   --dir D          state directory (default ${TMPDIR:-/tmp}/attnstore-redis-<uid>-<port-base>)
#   --password PW    requirepass and masterauth on every node
#   --user U         also an ACL user U with password PW (needs --password), all commands
#   --maxmemory M    per node, with maxmemory-policy allkeys-lru (default 256mb)
#   --bulk-len L     proto-max-bulk-len of every node (default 64mb; values are 1-4 MiB)
#   --node PORT      kill-node, restart-node: the node (one of the cluster's ports)
#
# Every node: bind 127.0.0.1, protected-mode yes, proto-max-bulk-len (--bulk-len),
# cluster-node-timeout 2000 (failover in seconds), cluster-require-full-coverage
# no (a dead master takes only its own slots down).
# start is idempotent: a healthy cluster already running in D is reported, not restarted;
# leftovers of a broken one in D are stopped first. A port in use by anything else is
# refused. Exit codes: 0 ok, 1 failed, 2 usage, 77 redis-server or redis-cli missing (ctest
# reports a test that exits 77 as skipped).
set -euo pipefail

cmd=${1:-}
[ $# -gt 0 ] && shift
masters=3 replicas=0 port_base=7100 dir="" password="" user="" maxmemory=256mb bulk_len=64mb node=""
usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --masters) masters=${2:?}; shift 2 ;;
    --replicas) replicas=${2:?}; shift 2 ;;
    --port-base) port_base=${2:?}; shift 2 ;;
    --dir) dir=${2:?}; shift 2 ;;
    --password) password=${2:?}; shift 2 ;;
    --user) user=${2:?}; shift 2 ;;
    --maxmemory) maxmemory=${2:?}; shift 2 ;;
    --bulk-len) bulk_len=${2:?}; shift 2 ;;
    --node) node=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "redis-cluster.sh: unknown option '$1'" >&2; usage ;;
  esac
done
case $cmd in start|stop|status|kill-node|restart-node) ;; *) usage ;; esac
die() { echo "redis-cluster.sh: $*" >&2; exit 1; }
[[ $masters =~ ^[0-9]+$ ]] && [ "$masters" -ge 3 ] || die "--masters must be a number >= 3 (redis-cli --cluster create needs 3), got '$masters'"
[[ $replicas =~ ^[01]$ ]] || die "--replicas must be 0 or 1, got '$replicas'"
[[ $port_base =~ ^[0-9]+$ ]] || die "--port-base must be a number, got '$port_base'"
nodes=$((masters * (1 + replicas)))
[ "$port_base" -ge 1024 ] && [ $((port_base + nodes - 1 + 10000)) -le 65535 ] ||
  die "--port-base must be in [1024, $((65535 - 10000 - nodes + 1))] (bus ports are port+10000), got $port_base"
[ -z "$user" ] || [ -n "$password" ] || die "--user needs --password"
[[ $bulk_len =~ ^[0-9]+(b|kb|mb|gb)?$ ]] || die "--bulk-len must be a size such as 64mb, got '$bulk_len'"
[[ $user =~ ^[A-Za-z0-9_.-]*$ ]] || die "--user may hold only letters, digits, '_', '.', '-'"
case $password in *[[:space:]\"\'\\]*) die "--password may not hold spaces, quotes or backslashes" ;; esac
[ -n "$dir" ] || dir="${TMPDIR:-/tmp}/attnstore-redis-$(id -u)-$port_base"
marker="$dir/.attnstore-redis-cluster"
ports=()
for ((i = 0; i < nodes; i++)); do ports+=($((port_base + i))); done
# stop and status use what start recorded (node ports, password), whatever else they are given.
if [ "$cmd" != start ] && [ -f "$marker" ]; then
  mapfile -t ports <"$dir/ports"
  password=$(cat "$dir/password")
fi

if [ "$cmd" != stop ] && { ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; }; then
  echo "redis-cluster.sh: redis-server/redis-cli not installed (scripts/deps.sh installs them)" >&2
  exit 77
fi

# Admin commands authenticate as the default user; REDISCLI_AUTH keeps the password off
# the command line (and redis-cli's warning off stderr).
cli_timeout=5  # seconds for one admin command; the cluster creation gets longer
cli() {  # port, args...
  local p=$1
  shift
  if [ -n "$password" ]; then
    REDISCLI_AUTH=$password timeout "$cli_timeout" redis-cli -h 127.0.0.1 -p "$p" "$@"
  else
    timeout "$cli_timeout" redis-cli -h 127.0.0.1 -p "$p" "$@"
  fi
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
node_pid() {  # port: pid of our redis-server on it, if it still runs
  local f="$dir/$1/redis.pid" pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "redis-server.*:$1" || return 1
  echo "$pid"
}
node_state() { cli "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n 's/^cluster_state://p'; }
all_ok() {
  local p
  for p in "${ports[@]}"; do [ "$(node_state "$p")" = ok ] || return 1; done
}

stop_nodes() {
  local p pid pids=()
  for p in "${ports[@]}"; do
    if pid=$(node_pid "$p"); then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for pid in "${pids[@]}"; do  # SIGTERM: a clean shutdown (nothing to save); KILL after 5 s
    for ((t = 0; t < 50; t++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

case $cmd in
  kill-node|restart-node)
    [ -f "$marker" ] || die "no cluster in $dir"
    [[ $node =~ ^[0-9]+$ ]] || die "$cmd needs --node PORT"
    known=0
    for p in "${ports[@]}"; do [ "$p" = "$node" ] && known=1; done
    [ $known = 1 ] || die "port $node is not a node of the cluster in $dir (${ports[*]})"
    if [ "$cmd" = kill-node ]; then
      pid=$(node_pid "$node") || die "node $node is not running"
      kill -KILL "$pid"
      for ((t = 0; t < 50; t++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      ! kill -0 "$pid" 2>/dev/null || die "node $node (pid $pid) survived SIGKILL for 5 s"
      echo "redis-cluster.sh: killed node $node (pid $pid)" >&2
    else
      if node_pid "$node" >/dev/null; then
        echo "redis-cluster.sh: node $node is already running" >&2
        exit 0
      fi
      redis-server "$dir/$node/redis.conf" >/dev/null || die "redis-server on port $node failed to start; see $dir/$node/redis.log"
      for ((t = 0; t < 100; t++)); do
        [ "$(cli "$node" ping 2>/dev/null)" = PONG ] && break
        sleep 0.1
      done
      [ "$(cli "$node" ping 2>/dev/null)" = PONG ] || die "node $node does not answer PING; see $dir/$node/redis.log"
      echo "redis-cluster.sh: restarted node $node" >&2
    fi
    exit 0
    ;;
  status)
    [ -f "$marker" ] || { echo "no cluster in $dir"; exit 1; }
    rc=0
    for p in "${ports[@]}"; do
      if node_pid "$p" >/dev/null; then
        s=$(node_state "$p")
        role=$(cli "$p" role 2>/dev/null | head -1 | tr -d '\r')
        echo "127.0.0.1:$p ${role:-?} cluster_state:${s:-unknown}"
        [ "$s" = ok ] || rc=1
      else
        echo "127.0.0.1:$p down"
        rc=1
      fi
    done
    exit $rc
    ;;
  stop)
    if [ ! -e "$dir" ]; then
      echo "redis-cluster.sh: nothing to stop in $dir" >&2
      exit 0
    fi
    [ -f "$marker" ] || die "$dir was not made by redis-cluster.sh (no $(basename "$marker")); not touching it"
    stop_nodes
    rm -rf -- "$dir"
    echo "redis-cluster.sh: stopped ${#ports[@]} nodes, removed $dir" >&2
    exit 0
    ;;
esac

# ---- start
if [ -e "$dir" ]; then
  [ -f "$marker" ] || die "$dir exists and was not made by redis-cluster.sh; choose another --dir"
  want=("${ports[@]}")
  mapfile -t ports <"$dir/ports" 2>/dev/null || ports=()
  if [ "${ports[*]}" = "${want[*]}" ] && [ "$(cat "$dir/password" 2>/dev/null)" = "$password" ] && all_ok; then
    echo "redis-cluster.sh: already running in $dir" >&2
    echo "127.0.0.1:$port_base"
    exit 0
  fi
  echo "redis-cluster.sh: removing the leftovers of a cluster in $dir" >&2
  stop_nodes
  rm -rf -- "$dir"
  ports=("${want[@]}")
fi
for p in "${ports[@]}"; do
  for q in "$p" $((p + 10000)); do
    if port_open "$q"; then
      die "port $q (127.0.0.1) is in use by another process; choose another --port-base (nodes use $port_base-$((port_base + nodes - 1)) and those +10000)"
    fi
  done
done

umask 077
mkdir -p "$dir"
touch "$marker"
printf '%s\n' "${ports[@]}" >"$dir/ports"
printf '%s' "$password" >"$dir/password"
for p in "${ports[@]}"; do
  mkdir -p "$dir/$p"
  {
    echo "port $p"
    echo "bind 127.0.0.1"
    echo "protected-mode yes"
    echo "daemonize yes"
    echo "pidfile $dir/$p/redis.pid"
    echo "logfile $dir/$p/redis.log"
    echo "dir $dir/$p"
    echo "cluster-enabled yes"
    echo "cluster-config-file nodes.conf"
    echo "cluster-node-timeout 2000"
    echo "cluster-require-full-coverage no"
    echo "appendonly no"
    echo "save \"\""
    echo "proto-max-bulk-len $bulk_len"
    echo "maxmemory $maxmemory"
    echo "maxmemory-policy allkeys-lru"
    if [ -n "$password" ]; then
      echo "requirepass $password"
      echo "masterauth $password"
    fi
    if [ -n "$user" ]; then
      echo "user $user on >$password ~* &* +@all"
    fi
  } >"$dir/$p/redis.conf"
  redis-server "$dir/$p/redis.conf" >/dev/null || die "redis-server on port $p failed to start; see $dir/$p/redis.log"
done
for p in "${ports[@]}"; do
  for ((t = 0; t < 100; t++)); do
    [ "$(cli "$p" ping 2>/dev/null)" = PONG ] && break
    sleep 0.1
  done
  [ "$(cli "$p" ping 2>/dev/null)" = PONG ] || die "node $p does not answer PING; see $dir/$p/redis.log"
done

addrs=()
for p in "${ports[@]}"; do addrs+=("127.0.0.1:$p"); done
if ! out=$(cli_timeout=60 cli "$port_base" --cluster create "${addrs[@]}" --cluster-replicas "$replicas" --cluster-yes 2>&1); then
  echo "$out" >&2
  die "redis-cli --cluster create failed"
fi

# Every node must agree before a client is pointed at it; replicas must have synced
# (a replica that never synced cannot take over).
for ((t = 0; t < 300; t++)); do
  ready=1
  all_ok || ready=0
  if [ $ready = 1 ] && [ "$replicas" = 1 ]; then
    for p in "${ports[@]}"; do
      info=$(cli "$p" info replication 2>/dev/null | tr -d '\r')
      if grep -q '^role:slave' <<<"$info" && ! grep -q '^master_link_status:up' <<<"$info"; then ready=0; fi
    done
  fi
  [ $ready = 1 ] && break
  sleep 0.1
done
if [ $ready != 1 ]; then
  for p in "${ports[@]}"; do echo "127.0.0.1:$p cluster_state:$(node_state "$p")" >&2; done
  die "the cluster did not reach cluster_state:ok on every node within 30 s"
fi
echo "redis-cluster.sh: $masters masters, $replicas replica(s) each, ports $port_base-$((port_base + nodes - 1)), dir $dir" >&2
echo "127.0.0.1:$port_base"
