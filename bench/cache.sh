#!/usr/bin/env bash
# What a cache holds: a tree (default: this machine's Python standard library, without tests and
# site-packages) packed with zstd, served by incfs serve on 127.0.0.1, mounted with a fresh
# cache, completed in the background, every file read once; then `du -sb` of the cache against
# the original tree (passthrough on: plain copies kept) and against the repository (passthrough
# off: compressed blocks only), each measured in the same run. Also the bytes by kind that
# `incfs status` reports.
# Usage: bench/cache.sh [TREE]   (root; about a minute; uses /var/tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p incfs-cli >/dev/null 2>&1
INCFS=${INCFS:-$PWD/target/release/incfs}
work=$(mktemp -d /var/tmp/incfs-bench-cache.XXXXXX)
serve_pid=
cleanup() {
  for m in "$work"/mnt-*; do
    [ -d "$m" ] || continue
    grep -q " $m fuse" /proc/mounts && { "$INCFS" unmount "$m" 2>/dev/null || umount -l "$m" || true; }
  done
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
tree=$work/tree
if [ $# -ge 1 ]; then
  cp -a "$1" "$tree"
else
  stdlib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
  mkdir -p "$tree"
  tar -C "$stdlib" --exclude=./site-packages --exclude=./test -cf - . | tar -C "$tree" -xf -
fi
"$INCFS" keygen --out "$work/key" >/dev/null
"$INCFS" pack "$tree" "$work/repo" --key "$work/key.pem" --quiet
"$INCFS" serve "$work/repo" --listen 127.0.0.1:0 >"$work/serve.out" 2>&1 &
serve_pid=$!
for _ in $(seq 100); do grep -q http "$work/serve.out" && break; sleep 0.05; done
url=$(grep -o 'http://[0-9.:]*' "$work/serve.out" | head -1)
du_b() { du -sb "$1" | cut -f1; }
tree_b=$(du_b "$tree")
repo_b=$(du_b "$work/repo")
files=$(find "$tree" -type f | wc -l)
echo "tree: $files files, $tree_b bytes (du -sb); repository: $repo_b bytes"
for pt in auto off; do
  m=$work/mnt-$pt c=$work/cache-$pt
  mkdir -p "$m"
  "$INCFS" mount "$url" "$m" --trust "$work/key.pub.pem" --cache "$c" --passthrough "$pt" >/dev/null
  for _ in $(seq 600); do
    "$INCFS" status "$m" --json | grep -q '"complete":true' && break
    sleep 0.1
  done
  find "$m" -type f -exec cat {} + >/dev/null
  status=$("$INCFS" status "$m" --json)
  "$INCFS" unmount "$m"
  cache_b=$(du_b "$c")
  echo "$status" | python3 -c '
import json, sys
u = json.load(sys.stdin)["cache_usage"]
print("  by kind: " + ", ".join(f"{k} {v}" for k, v in u.items()))'
  if [ "$pt" = auto ]; then
    awk -v c="$cache_b" -v t="$tree_b" 'BEGIN {printf "passthrough auto: cache %d bytes = %.2fx the tree\n", c, c/t}'
  else
    awk -v c="$cache_b" -v r="$repo_b" 'BEGIN {printf "passthrough off:  cache %d bytes = %.2fx the repository\n", c, c/r}'
  fi
done
