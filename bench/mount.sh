#!/usr/bin/env bash
# Benchmark of the mount, every figure against a baseline measured in the same run:
#   cold sequential read of a 1 GiB file through a fresh mount  vs  curl of the same bytes
#   warm re-read (page cache kept, and dropped)                   vs  the same file on local disk
#   4 KiB random reads (fio, 15 s)                                vs  the same file on local disk
#   find / ls -lR of the Python standard library                  vs  the same tree on local disk
#   cold start of a Python import workload, 0 and 20 ms RTT       vs  the same imports from local disk
# Usage: bench/mount.sh   (root; about 3 minutes; uses /var/tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh fio
cargo build --release --locked -p incfs-cli >/dev/null 2>&1
INCFS=$PWD/target/release/incfs
work=$(mktemp -d /var/tmp/incfs-bench-mount.XXXXXX)
pids=()
cleanup() {
  for m in "$work"/mnt-*; do
    while grep -q " $m fuse" /proc/mounts; do "$INCFS" unmount "$m" || umount -l "$m"; done
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); awk -v s="$s" -v e="$e" 'BEGIN {printf "%.3f", e-s}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }
row() { printf '%-44s %12s %12s %10s\n' "$@"; }

mkdir -p "$work/src/big" "$work/src/stdlib"
head -c $((1 << 30)) /dev/urandom > "$work/src/big/file.bin"
stdlib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
tar -C "$stdlib" --exclude=./site-packages --exclude=./test -cf - . | tar -C "$work/src/stdlib" -xf -
"$INCFS" keygen --out "$work/key" >/dev/null
"$INCFS" pack "$work/src" "$work/repo" --key "$work/key.pem" -q >/dev/null
"$INCFS" serve "$work/repo" --listen 127.0.0.1:0 > "$work/serve.out" 2>/dev/null &
pids+=($!)
for _ in $(seq 100); do grep -q http "$work/serve.out" 2>/dev/null && break; sleep 0.05; done
url=$(sed -n 's/.* at \(http[^ ]*\)/\1/p' "$work/serve.out" | sed 's#/$##')
port=${url##*:}
pport=$((port + 1))
python3 bench/delay_proxy.py "$pport" "$port" 20 &
pids+=($!)
sleep 0.5

mount_fresh() { # mount_fresh NAME SOURCE: mount at $work/mnt-NAME with a fresh cache
  mkdir -p "$work/mnt-$1"
  "$INCFS" mount "$2" "$work/mnt-$1" --trust "$work/key.pub.pem" --cache "$work/cache-$1" >/dev/null
}

row "measurement" "incfs (s)" "baseline (s)" "ratio"
# 1. Cold sequential read vs curl of the objects holding the same bytes.
curl_all() { for o in "$work"/repo/objects/*; do curl -s -o /dev/null "$url/objects/${o##*/}"; done; }
drop
t_curl=$(secs curl_all)
mount_fresh seq "$url"; m=$work/mnt-seq; drop
t=$(secs cat "$m/big/file.bin")
row "cold sequential 1 GiB (vs curl)" "$t" "$t_curl" "$(ratio "$t" "$t_curl")"
# 2. Warm re-read, page cache kept / dropped, vs local disk.
cat "$work/src/big/file.bin" >/dev/null
t_local=$(secs cat "$work/src/big/file.bin")
t=$(secs cat "$m/big/file.bin")
row "warm re-read, page cache kept (vs local)" "$t" "$t_local" "$(ratio "$t" "$t_local")"
drop; t_local=$(secs cat "$work/src/big/file.bin")
drop; t=$(secs cat "$m/big/file.bin")
row "warm re-read, page cache dropped (vs local)" "$t" "$t_local" "$(ratio "$t" "$t_local")"
# 3. 4 KiB random reads (fio psync, page cache dropped first), IOPS.
fio_iops() {
  drop
  fio --name=r --filename="$1" --rw=randread --bs=4k --ioengine=psync --runtime=15 --time_based \
    --readonly --invalidate=1 --output-format=terse 2>/dev/null | awk -F';' '{print $8}'
}
i_local=$(fio_iops "$work/src/big/file.bin")
i=$(fio_iops "$m/big/file.bin")
row "4 KiB random read IOPS (local store vs disk)" "$i" "$i_local" "$(ratio "$i" "$i_local")"
# 4. Metadata walks.
drop; t_local=$(secs find "$work/src/stdlib"); drop; t=$(secs find "$m/stdlib")
row "find stdlib (vs local)" "$t" "$t_local" "$(ratio "$t" "$t_local")"
drop; t_local=$(secs ls -lR "$work/src/stdlib"); drop; t=$(secs ls -lR "$m/stdlib")
row "ls -lR stdlib (vs local)" "$t" "$t_local" "$(ratio "$t" "$t_local")"
# 5. Cold start of an import workload from a fresh mount, 0 and 20 ms added RTT.
imports="import json, email.parser, http.client, decimal, csv, argparse, logging, unittest, asyncio, xml.dom.minidom"
workload() { python3 -I -S -c "import sys; sys.path.insert(0, '$1'); $imports; assert json.__file__.startswith('$1')"; }
drop; t_local=$(secs workload "$work/src/stdlib")
mount_fresh py0 "$url"; m0=$work/mnt-py0; drop; t0=$(secs workload "$m0/stdlib")
row "python imports, fresh mount, 0 ms RTT" "$t0" "$t_local" "$(ratio "$t0" "$t_local")"
mount_fresh py20 "http://127.0.0.1:$pport"; m20=$work/mnt-py20; drop; t20=$(secs workload "$m20/stdlib")
row "python imports, fresh mount, 20 ms RTT" "$t20" "$t_local" "$(ratio "$t20" "$t_local")"
echo "status of the 20 ms mount after the import workload:"
"$INCFS" status "$m20" | sed -n '5,7p'
