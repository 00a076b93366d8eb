#!/usr/bin/env bash
# Reads through a cache limited to half the image, against the same reads with no limit, each
# on a fresh mount and cache, page cache dropped, served by incfs serve on 127.0.0.1
# (--background off, --passthrough off: every read goes through the daemon and its store):
#   sequential: `cat` of a 256 MiB random file, twice (the second pass, with the limit, finds
#               the first half evicted and fetches it again);
#   random:     4 KiB reads at 20,000 random offsets (python, os.pread), twice.
# The per-read cost of recency tracking is the difference of the second passes where nothing is
# evicted (no limit vs a limit above the image: `--cache-size 1G`), since recency is only tracked
# once a limit exists (a segment's mtime, bumped at most once a second).
# Usage: [INCFS=PATH] bench/cache_limit.sh   (root; about a minute; uses /var/tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
INCFS=${INCFS:-$PWD/target/release/incfs}
[ -x "$INCFS" ] || cargo build --release --locked -p incfs-cli >/dev/null
work=$(mktemp -d /var/tmp/incfs-bench-limit.XXXXXX)
serve_pid=
cleanup() {
  set +e
  for m in "$work"/mnt-*; do grep -q " $m fuse" /proc/mounts && "$INCFS" unmount "$m"; done
  [ -n "$serve_pid" ] && kill "$serve_pid"
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/tree"
head -c $((256 << 20)) /dev/urandom > "$work/tree/big.bin"
"$INCFS" keygen --algorithm ed25519 --out "$work/key" >/dev/null
"$INCFS" pack "$work/tree" "$work/repo" --key "$work/key.pem" >/dev/null 2>&1
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$INCFS" serve "$work/repo" --listen "127.0.0.1:$port" >/dev/null 2>&1 & serve_pid=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/manifest" && break; sleep 0.1; done
now() { date +%s.%N; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
rand() { python3 - "$1" <<'PY'
import os, random, sys
f = os.open(sys.argv[1], os.O_RDONLY); size = os.fstat(f).st_size; r = random.Random(7)
for _ in range(20000): os.pread(f, 4096, r.randrange(size // 4096) * 4096)
PY
}
# run NAME LIMIT-ARGS...: prints "seq1 seq2 rand1 rand2" seconds
run() {
  local name=$1; shift
  local out=()
  for kind in seq rand; do
    local m=$work/mnt-$name-$kind c=$work/cache-$name-$kind
    mkdir -p "$m"
    "$INCFS" mount "http://127.0.0.1:$port" "$m" --trust "$work/key.pub.pem" --cache "$c" \
      --background off --passthrough off "$@" >/dev/null
    for pass in 1 2; do
      drop; local t0; t0=$(now)
      if [ "$kind" = seq ]; then cat "$m/big.bin" >/dev/null; else rand "$m/big.bin"; fi
      out+=("$(awk -v a="$(now)" -v b="$t0" 'BEGIN {printf "%.3f", a-b}')")
    done
    "$INCFS" unmount "$m" >/dev/null
  done
  echo "${out[*]}"
}
read -r s1 s2 r1 r2 <<<"$(run none)"
read -r ls1 ls2 lr1 lr2 <<<"$(run half --cache-size 128M)"
read -r bs1 bs2 br1 br2 <<<"$(run above --cache-size 1G)"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }
mibs() { awk -v t="$1" 'BEGIN {printf "%.1f", 256/t}'; }
echo "incfs bench/cache_limit.sh: $(date -u '+%F %T UTC'), $(nproc) cores, commit $(git rev-parse --short HEAD)"
printf '%-44s %10s %10s %8s\n' "256 MiB random file, seconds" "no limit" "limit 128M" "ratio"
printf '%-44s %10s %10s %8s\n' "sequential cat, cold" "$s1" "$ls1" "$(ratio "$ls1" "$s1")"
printf '%-44s %10s %10s %8s\n' "sequential cat, second pass (refetches half)" "$s2" "$ls2" "$(ratio "$ls2" "$s2")"
printf '%-44s %10s %10s %8s\n' "20,000 random 4 KiB reads, cold" "$r1" "$lr1" "$(ratio "$lr1" "$r1")"
printf '%-44s %10s %10s %8s\n' "20,000 random 4 KiB reads, second pass" "$r2" "$lr2" "$(ratio "$lr2" "$r2")"
echo "MiB/s sequential cold: no limit $(mibs "$s1"), limit $(mibs "$ls1")"
echo "recency tracking (limit 1G, nothing evicted) vs no limit, second passes: sequential $bs2 vs $s2 s ($(ratio "$bs2" "$s2")x), random $br2 vs $r2 s ($(ratio "$br2" "$r2")x)"
