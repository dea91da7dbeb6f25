#!/usr/bin/env bash
# Find the system tools the test suite and benches use; install the missing ones with apt-get when
# we can (root + apt-get), otherwise say exactly what to install. Never fails the build by itself:
# a test that needs a missing tool fails (under CI=true) or skips with the same message.
set -u
declare -A PKG=( [curl]=curl [redis-server]=redis-server [wrk]=wrk [nginx]=nginx-light [chromium]=chromium [slowhttptest]=slowhttptest [varnishtest]=varnish )
missing=()
for bin in "${!PKG[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("${PKG[$bin]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${missing[*]} with apt-get"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >/tmp/fastgate-apt.log 2>&1 || echo "system-deps: apt-get failed (see /tmp/fastgate-apt.log); missing: ${missing[*]}"
else
  echo "system-deps: missing ${missing[*]} — install with: sudo apt-get install ${missing[*]}"
fi
exit 0
