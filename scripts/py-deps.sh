#!/usr/bin/env bash
# Installs the Python test referees from PyPI (pinned by hash) into a cache outside the
# tree and prints the directory to put on PYTHONPATH. The library itself needs none.
#   prometheus_client: parses the metrics exposition in tests/metrics/test_scrape.py
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${ATTNSTORE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/attnstore}
target="$cache/python-referees-1"
if [ ! -f "$target/.complete" ]; then
  python3 -m pip --version >/dev/null 2>&1 || "$root/scripts/deps.sh" python3-pip
  req=$(mktemp)
  echo "prometheus_client==0.21.1 --hash=sha256:594b45c410d6f4f8888940fe80b5cc2521b305a1fafe1c58609ef715a001f301" >"$req"
  rm -rf "$target"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --require-hashes --target "$target" -r "$req" >&2
  rm -f "$req"
  touch "$target/.complete"
fi
echo "$target"
