#!/usr/bin/env bash
# Benchmark of complete files and of cold starts, every figure against a baseline measured in the
# same run:
#   1. warm reads of a complete 1 GiB file (prefetched), FUSE passthrough on and off:
#        sequential dd bs=1M, page cache dropped        vs  the same file on local disk (/var/tmp)
#        4 KiB random reads (fio, O_DIRECT, 15 s), 1 and 4 jobs  vs  the same file on local disk
#   2. cold start of a Python import workload (the stdlib) from one nginx on 127.0.0.1, direct
#      (0 ms) and through bench/delay_proxy.py (20 ms RTT), fresh cache each run:
#        incfs (background on / with a recorded access profile / background off),
#        httpdirfs --cache and rclone mount :http: --vfs-cache-mode full  vs  local disk
# Usage: bench/complete.sh   (root; about 5 minutes; uses /var/tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh fio nginx httpdirfs rclone
cargo build --release --locked -p incfs-cli >/dev/null 2>&1
INCFS=$PWD/target/release/incfs
start=$(date +%s)
work=$(mktemp -d /var/tmp/incfs-bench-complete.XXXXXX)
pids=()
cleanup() {
  for m in "$work"/mnt-*; do
    [ -d "$m" ] || continue
    for _ in 1 2 3; do
      grep -q " $m fuse" /proc/mounts || break
      "$INCFS" unmount "$m" 2>/dev/null || umount "$m" 2>/dev/null || umount -l "$m" || true
      sleep 0.2
    done
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a-b}'; }
# secs CMD...: run CMD (output discarded) and print its wall time in seconds, or "fail".
secs() { local s e; s=$(now); if "$@" >/dev/null 2>&1; then e=$(now); sub "$e" "$s"; else echo fail; fi; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a+0 > 0 && b+0 > 0) printf "%.2f", a/b; else printf "n/a"}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
rows=()
row() { rows+=("$(printf '%-52s %14s %12s %8s' "$@")"); }
notes=()
note() { notes+=("$*"); echo "  $*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done; return 1; }
mounted() { grep -q " $1 fuse" /proc/mounts; }
stat_json() { "$INCFS" status "$1" --json | python3 -c 'import json, sys; print(json.load(sys.stdin).get(sys.argv[1]))' "$2"; }
# wait_gone PID: wait up to 10 s for a process to exit, then kill it.
wait_gone() { for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done; kill "$1" 2>/dev/null || true; }
daemon_pid() { sed -n 's/.*daemon pid \([0-9]*\).*/\1/p' "$1"; }
# incfs_mount NAME URL [options...]: mount at $work/mnt-NAME with a fresh cache $work/cache-NAME.
incfs_mount() {
  local m=$work/mnt-$1 c=$work/cache-$1 url=$2
  shift 2
  rm -rf "$c"
  mkdir -p "$m"
  "$INCFS" mount "$url" "$m" --trust "$work/key.pub.pem" --cache "$c" "$@" > "$work/mount-$(basename "$m").out" 2>&1 || return 1
  dpid=$(daemon_pid "$work/mount-$(basename "$m").out")
  [ -n "$dpid" ] && pids+=("$dpid")
  return 0
}
incfs_unmount() { # incfs_unmount MNT: unmount and wait for the daemon to exit
  "$INCFS" unmount "$1" >/dev/null 2>&1 || umount "$1" || umount -l "$1"
  [ -n "${dpid:-}" ] && wait_gone "$dpid"
  return 0
}

echo "== setup ($(nproc) cores, kernel $(uname -r))" >&2
mkdir -p "$work/big" "$work/www/plain"
head -c $((1 << 30)) /dev/urandom > "$work/big/file.bin"
stdlib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
tar -C "$stdlib" --exclude=./site-packages --exclude=./test -cf - . | tar -C "$work/www/plain" -xf -
"$INCFS" keygen --out "$work/key" >/dev/null
"$INCFS" pack "$work/big" "$work/www/big" --key "$work/key.pem" -q >/dev/null
"$INCFS" pack "$work/www/plain" "$work/www/py" --key "$work/key.pem" -q >/dev/null

# One nginx: incfs repositories under /big/, /py/, /pyprof/; the plain stdlib tree with an HTML
# index under /plain/ (rclone) and /hd/ (httpdirfs: its Debian version 1.2.5 skips links that
# start with "_", so there the index's hrefs have their leading "_" percent-encoded; it also asks
# for the base URL without its trailing slash, answered with a redirect as for subdirectories).
port=$(free_port)
ng=$work/nginx
mkdir -p "$ng"
cat > "$ng/nginx.conf" <<EOF
user root;
daemon off;
master_process off;
worker_processes 1;
pid $ng/nginx.pid;
error_log $ng/error.log;
events { worker_connections 1024; }
http {
  access_log $ng/access.log;
  client_body_temp_path $ng;
  proxy_temp_path $ng;
  fastcgi_temp_path $ng;
  uwsgi_temp_path $ng;
  scgi_temp_path $ng;
  tcp_nodelay on;
  server {
    listen 127.0.0.1:$port;
    root $work/www;
    location /plain/ { autoindex on; }
    location = /hd { return 301 /hd/; }
    location /hd/ {
      alias $work/www/plain/;
      autoindex on;
      sub_filter '<a href="_' '<a href="%5F';
      sub_filter_once off;
    }
  }
}
EOF
nginx -c "$ng/nginx.conf" -p "$ng" 2>/dev/null &
pids+=($!)
url=http://127.0.0.1:$port
wait_http "$url/py/" || { echo "nginx did not start: $(cat "$ng/error.log")" >&2; exit 1; }
pport=$(free_port)
python3 bench/delay_proxy.py "$pport" "$port" 20 &
pids+=($!)
url20=http://127.0.0.1:$pport
wait_http "$url20/py/" || { echo "delay proxy did not start" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
echo "== 1. warm reads of a complete 1 GiB file" >&2
local_file=$work/big/file.bin
mib=1024
for mode in auto off; do
  incfs_mount "pt-$mode" "$url/big" --passthrough "$mode"
  eval "dpid_$mode=$dpid"
  "$INCFS" prefetch "$work/mnt-pt-$mode" -q
  [ "$(stat_json "$work/mnt-pt-$mode" complete)" = True ] || { echo "prefetch left $mode incomplete" >&2; exit 1; }
done
m_auto=$work/mnt-pt-auto
m_off=$work/mnt-pt-off
# Passthrough of a file > 8 MiB starts once its plain copy exists: open and close it once, then
# wait for the copy to cover it.
: < "$m_auto/file.bin"
for i in $(seq 1200); do
  pb=$(stat_json "$m_auto" plain_bytes)
  [ "$pb" != None ] && [ "$pb" -ge $((1 << 30)) ] && break
  [ "$i" = 1200 ] && { echo "the plain copy never covered the file (plain_bytes $pb)" >&2; exit 1; }
  sleep 0.1
done
dd_mbps() { # dd_mbps FILE: median MiB/s of 3 sequential reads, page cache dropped before each
  local t ts=()
  for _ in 1 2 3; do
    drop
    t=$(secs dd if="$1" of=/dev/null bs=1M)
    ts+=("$(awk -v t="$t" -v m=$mib 'BEGIN {if (t+0 > 0) printf "%.0f", m/t; else print "fail"}')")
  done
  median "${ts[@]}"
}
# fio: O_DIRECT works through passthrough (the kernel reads the plain copy with O_DIRECT), so
# the random reads go to the disk for the local file and for passthrough alike.
fio_iops() { # fio_iops FILE JOBS
  drop
  fio --name=r --filename="$1" --rw=randread --bs=4k --ioengine=psync --direct=1 --numjobs="$2" \
    --group_reporting --runtime=15 --time_based --readonly --output-format=terse 2>/dev/null |
    awk -F';' 'NR == 1 {printf "%.0f", $8}'
}
served0=$(stat_json "$m_auto" reads_served)
opens0=$(stat_json "$m_auto" opens_passthrough)
l_dd=$(dd_mbps "$local_file")
a_dd=$(dd_mbps "$m_auto/file.bin")
o_dd=$(dd_mbps "$m_off/file.bin")
row "1a seq read 1 GiB, dd bs=1M, cold page cache (MiB/s)" "" "" ""
row "   passthrough auto  vs local disk" "$a_dd" "$l_dd" "$(ratio "$a_dd" "$l_dd")"
row "   passthrough off   vs local disk" "$o_dd" "$l_dd" "$(ratio "$o_dd" "$l_dd")"
row "   passthrough auto  vs passthrough off" "$a_dd" "$o_dd" "$(ratio "$a_dd" "$o_dd")"
for jobs in 1 4; do
  l=$(fio_iops "$local_file" $jobs)
  a=$(fio_iops "$m_auto/file.bin" $jobs)
  o=$(fio_iops "$m_off/file.bin" $jobs)
  row "1b 4 KiB random read, O_DIRECT, $jobs job(s) (IOPS)" "" "" ""
  row "   passthrough auto  vs local disk" "$a" "$l" "$(ratio "$a" "$l")"
  row "   passthrough off   vs local disk" "$o" "$l" "$(ratio "$o" "$l")"
  row "   passthrough auto  vs passthrough off" "$a" "$o" "$(ratio "$a" "$o")"
done
served1=$(stat_json "$m_auto" reads_served)
opens1=$(stat_json "$m_auto" opens_passthrough)
if [ "$served1" = "$served0" ]; then
  note "passthrough: reads_served stayed at $served1 during all its dd and fio reads (none reached the daemon); opens_passthrough $opens0 -> $opens1"
else
  note "passthrough: reads_served GREW from $served0 to $served1 during its dd and fio reads; opens_passthrough $opens0 -> $opens1"
fi
note "passthrough off: reads_served $(stat_json "$m_off" reads_served) after its reads; with O_DIRECT its fio reads are served by the daemon from its store, which can sit in the page cache"
dpid=$dpid_auto incfs_unmount "$m_auto"
dpid=$dpid_off incfs_unmount "$m_off"

# ---------------------------------------------------------------------------------------------
echo "== 2. cold start of a Python import workload" >&2
imports="import json, email.parser, decimal, csv, http.client, argparse, logging, unittest, xml.dom.minidom, asyncio"
workload() { python3 -I -S -c "import sys; sys.path.insert(0, '$1'); $imports; assert json.__file__.startswith('$1'), json.__file__"; }
mp=$work/mnt-py
# Record an access profile of the workload, then publish the same tree with it.
incfs_mount rec "$url/py" --record-profile "$work/profile"
workload "$work/mnt-rec"
incfs_unmount "$work/mnt-rec"
[ -s "$work/profile" ] || { echo "no profile was recorded" >&2; exit 1; }
"$INCFS" pack "$work/www/plain" "$work/www/pyprof" --key "$work/key.pem" --profile "$work/profile" -q >/dev/null

# py_cold KIND SOURCE [incfs mount options...]: mount at $mp with a fresh cache (page cache
# dropped first), run the workload, unmount. Sets T_TOTAL (mount + imports), T_MOUNT and
# FAIL (empty, or why it failed).
py_cold() {
  local kind=$1 src=$2 t0 t1 t2 peer=
  shift 2
  FAIL= T_TOTAL= T_MOUNT= REQS= dpid=
  rm -rf "$work/cache-py"
  mkdir -p "$mp" "$work/cache-py"
  drop
  t0=$(now)
  case $kind in
    incfs)
      incfs_mount py "$src" "$@" || FAIL="mount failed: $(tail -1 "$work/mount-mnt-py.out")" ;;
    httpdirfs)
      httpdirfs -f --no-range-check --cache --cache-location "$work/cache-py" "$src" "$mp" > "$work/peer.log" 2>&1 &
      peer=$! ;;
    rclone) # in the foreground as our own job (not --daemon), so that its PID is known
      env -u AWS_CA_BUNDLE rclone mount :http: "$mp" --http-url "$src" --vfs-cache-mode full \
        --cache-dir "$work/cache-py" > "$work/peer.log" 2>&1 &
      peer=$! ;;
  esac
  if [ -n "$peer" ]; then
    pids+=("$peer")
    for _ in $(seq 3000); do
      mounted "$mp" && break
      kill -0 "$peer" 2>/dev/null || break
      sleep 0.01
    done
    mounted "$mp" || FAIL="did not mount: $(tail -1 "$work/peer.log")"
  fi
  t1=$(now)
  if [ -z "$FAIL" ]; then
    if workload "$mp" > "$work/workload.out" 2>&1; then
      t2=$(now)
      T_TOTAL=$(sub "$t2" "$t0") T_MOUNT=$(sub "$t1" "$t0")
    else
      FAIL="workload failed: $(tail -1 "$work/workload.out")"
    fi
  fi
  if [ "$kind" = incfs ]; then
    [ -z "$FAIL" ] && REQS=$(stat_json "$mp" fetch_requests)
    mounted "$mp" && incfs_unmount "$mp"
  else
    mounted "$mp" && { umount "$mp" 2>/dev/null || umount -l "$mp"; }
    [ -n "$peer" ] && wait_gone "$peer"
  fi
  return 0
}
# py_runs N KIND SOURCE [options...]: N cold runs; sets T_TOTAL, T_MOUNT, REQS to the medians.
py_runs() {
  local n=$1 totals=() mnts=() reqs=()
  shift
  for _ in $(seq "$n"); do
    py_cold "$@"
    [ -n "$FAIL" ] && return 0
    totals+=("$T_TOTAL") mnts+=("$T_MOUNT") reqs+=("${REQS:-0}")
  done
  T_TOTAL=$(median "${totals[@]}") T_MOUNT=$(median "${mnts[@]}") REQS=$(median "${reqs[@]}")
}
py_row() { # py_row LABEL BASELINE
  if [ -n "$FAIL" ]; then
    row "$1" "n/a" "$2" ""
    note "${1#   } at $rtt ms RTT: n/a ($FAIL)"
  else
    row "$1" "$T_TOTAL" "$2" "$(ratio "$T_TOTAL" "$2")"
  fi
}
runs=3
t_locals=()
for _ in $(seq $runs); do drop; t_locals+=("$(secs workload "$work/www/plain")"); done
t_local=$(median "${t_locals[@]}")
for rtt in 0 20; do
  [ $rtt = 0 ] && u=$url || u=$url20
  row "2  python imports cold, $rtt ms RTT (s, mount+imports)" "" "" ""
  row "   local disk (baseline)" "$t_local" "$t_local" "1.00"
  py_runs $runs incfs "$u/py"
  py_row "   incfs, --background on (default)" "$t_local"
  mounts="incfs on ${T_MOUNT:-?} s (${REQS:-?} fetch requests)"
  py_runs $runs incfs "$u/pyprof"
  py_row "   incfs, with recorded profile" "$t_local"
  mounts+=", profile ${T_MOUNT:-?} s (${REQS:-?} requests)"
  py_runs $runs incfs "$u/py" --background off
  py_row "   incfs, --background off" "$t_local"
  mounts+=", off ${T_MOUNT:-?} s (${REQS:-?} requests)"
  py_runs 1 httpdirfs "$u/hd/"
  py_row "   httpdirfs --cache (1 run)" "$t_local"
  mounts+=", httpdirfs ${T_MOUNT:-?} s"
  py_runs $runs rclone "$u/plain/"
  py_row "   rclone mount --vfs-cache-mode full" "$t_local"
  mounts+=", rclone ${T_MOUNT:-?} s"
  note "$rtt ms RTT, median time to mount (part of the totals): $mounts"
done

echo
printf '%-52s %14s %12s %8s\n' "measurement" "incfs/peer" "baseline" "ratio"
printf '%s\n' "${rows[@]}"
echo
echo "ratio = incfs (or peer) / baseline. Part 1 (MiB/s, IOPS): higher is better, target >= 0.9."
echo "Part 2 (seconds, mount + imports): lower is better, 1.00 = as fast as local disk."
echo "fio: --ioengine=psync --direct=1 --runtime=15 --time_based; dd: median of 3 runs."
echo "Part 2: median of $runs cold runs (httpdirfs: 1, it takes ~30 s a run); every run with a fresh cache and the page"
echo "cache dropped; 0 ms RTT = nginx directly, 20 ms RTT = through bench/delay_proxy.py."
printf '%s\n' "${notes[@]}"
echo "run time: $(( $(date +%s) - start )) s"
