#!/usr/bin/env bash
# Installs the Debian packages attnstore builds and tests with (only the missing ones).
# Extra package names given as arguments are checked too (scripts/fuzz.sh passes clang
# and libFuzzer's runtime, which only fuzzing needs).
set -euo pipefail
pkgs=(g++ cmake ninja-build pkg-config liburing-dev libxxhash-dev catch2 libbenchmark-dev fio
  redis-server libhiredis-dev "$@")  # redis: the shared tier's client and its test cluster (issue 15)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "attnstore: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
