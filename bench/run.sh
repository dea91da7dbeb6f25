#!/usr/bin/env bash
# Side-by-side bench: wrk → {nginx upstream directly, nginx reverse proxy, fastgate}, pinned, interleaved.
# Usage: bash bench/run.sh [compare.py options]   (e.g. --rounds 5 --duration 10 --scenario routes)
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "bench needs: ${need[*]} (sudo apt-get install ${need[*]})" >&2; exit 2
  fi
fi
[ -x .venv/bin/fastgate ] || make build
exec .venv/bin/python bench/compare.py "$@"
