#!/usr/bin/env bash
# Benchmark of cold reads through a fresh mount (the block store and fetch pipeline), every figure
# against a baseline measured in the same run, median of RUNS runs:
#   1. cold sequential read (cat) of a 1 GiB file, half random / half compressible text, packed
#      with zstd, from one nginx on 127.0.0.1, direct (loopback) and through tools/delay-proxy
#      (20 ms RTT), --background off, fresh cache, page cache dropped
#        vs  curl of every object of the repository from the same nginx (same path)
#      and once more at loopback with the server's files already in the page cache, curl and
#      incfs alike (a server that does not read the VM's disk: curl's cold figure follows that
#      disk, 0.46-1.0 s for the same bytes within one bench)
#   2. daemon CPU seconds (utime+stime) per GiB and peak RSS (VmHWM) during the loopback cold read
#        vs  curl's CPU seconds per GiB of object bytes
#      (and for 1: the machine's cores busy on average during each curl and cat, every process
#      counted: near the core count, the CPU rather than the network sets the pace)
#   3. PERF=1: perf record -g of the daemon during one more loopback cold read, report saved to
#      bench/out/perf-cold.txt (and the data, bench/out/perf-cold.data)
#   4. background completion of the whole image (default --background on, --passthrough off),
#      from running `incfs mount` until `incfs status --json` says "complete": true
#        vs  curl of every object (loopback)
#   5. cold start of a Python import workload (the stdlib, packed in the same tree) from a fresh
#      mount: --background off at 0 and 20 ms RTT, default settings at 20 ms RTT (python's run
#      only, the mount is done before)  vs  the same imports from the local copy
#      (+ the nginx requests and bytes of the 20 ms --background off run)
#   6. (SKIP_SCALE=1 skips) an image of 100,000 files of 100 bytes (100 dirs x 1000): time for
#      `incfs mount` to return, `find MNT | wc -l`, daemon VmRSS/VmHWM after the find
#        vs  curl of the manifest, and find on the local tree
# 20 ms RTT: this kernel has no netem, so the 20 ms runs go through tools/delay-proxy, a TCP proxy
# on 127.0.0.1 that forwards every chunk RTT/2 after it arrived, in each direction, in order, without
# a bandwidth limit. It is in Rust because the asyncio one (bench/delay_proxy.py, still used by
# bench/mount.sh and bench/complete.sh) tops out at ~0.5-0.6 GiB/s on the 2-core VM, so the 20 ms
# curl and incfs figures measured it; through tools/delay-proxy curl gets ~1.2 GiB/s from a hot
# page cache, about what it gets from nginx directly.
# Usage: [RUNS=3] [PERF=1] [SKIP_SCALE=1] [NO_BUILD=1] [INCFS=PATH] [DELAY_PROXY=PATH] bench/cold.sh
#        [COMPARE=OTHER_INCFS [PAIRS=6] [COMPARE_ON=cold|py20]]: only a paired A/B of the loopback
#        cold read (time and daemon CPU of this binary against OTHER_INCFS, in alternating order),
#        or with COMPARE_ON=py20 of the python workload at 20 ms RTT, default settings; then exit
#        (root; with the ~60 MiB/s build at d871580: ~2.5 minutes at RUNS=1, ~6 at RUNS=3;
#        uses /var/tmp, ~4 GiB)
# The binaries are target/release/incfs and target/release/delay-proxy, built first (cargo build
# --release --locked) unless NO_BUILD=1 (then used as they are); INCFS= or DELAY_PROXY= use the
# given binary instead (not built).
set -euo pipefail
# Given paths resolved before the cd below, so that relative ones work.
[ -z "${INCFS:-}" ] || INCFS=$(realpath -m -- "$INCFS")
[ -z "${DELAY_PROXY:-}" ] || DELAY_PROXY=$(realpath -m -- "$DELAY_PROXY")
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
PERF=${PERF:-0}
SKIP_SCALE=${SKIP_SCALE:-0}
if [ "$PERF" = 1 ]; then scripts/deps.sh nginx curl linux-perf; else scripts/deps.sh nginx curl; fi
build=()
[ -n "${INCFS:-}" ] || build+=(-p incfs-cli)
[ -n "${DELAY_PROXY:-}" ] || build+=(-p delay-proxy)
if [ "${NO_BUILD:-0}" != 1 ] && [ ${#build[@]} -gt 0 ]; then
  cargo build --release --locked "${build[@]}" >/dev/null 2>&1 || { echo "cargo build ${build[*]} failed" >&2; exit 1; }
fi
INCFS=${INCFS:-$PWD/target/release/incfs}
DELAY_PROXY=${DELAY_PROXY:-$PWD/target/release/delay-proxy}
[ -x "$INCFS" ] || { echo "no $INCFS (build it, or drop NO_BUILD=1)" >&2; exit 1; }
[ -x "$DELAY_PROXY" ] || { echo "no $DELAY_PROXY (build it, or drop NO_BUILD=1)" >&2; exit 1; }
# The real interpreter, not a pyenv shim (a shim adds its own start-up to every timed run).
PY=$(python3 -c 'import sys; print(sys.executable)')
start=$(date +%s)
dirty=
[ -n "$(git status --porcelain -- crates/ 2>/dev/null)" ] && dirty=+dirty
[ -n "$(find crates -type f -newer "$INCFS" -print -quit 2>/dev/null)" ] && dirty+=" (crates/ has files newer than the binary)"
header="incfs bench/cold.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), kernel $(uname -r), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$dirty, binary $INCFS built $(date -u -r "$INCFS" '+%Y-%m-%d %H:%M:%S UTC'), RUNS=$RUNS"
echo "== $header" >&2

work=$(mktemp -d /var/tmp/incfs-bench-cold.XXXXXX)
pids=()
cleanup() {
  set +e
  trap - ERR
  for m in "$work"/mnt-*; do
    [ -d "$m" ] || continue
    for _ in 1 2 3; do
      grep -q " $m fuse" /proc/mounts || break
      "$INCFS" unmount "$m" 2>/dev/null || umount "$m" 2>/dev/null || umount -l "$m"
      sleep 0.2
    done
  done
  # The 100k-file tree lives on an ext4 image of its own: unlinking 100,000 small files that reached
  # the disk takes minutes on a filesystem mounted with "discard" (one discard per file).
  if [ -n "${loopmnt:-}" ] && grep -q " $loopmnt " /proc/mounts; then umount "$loopmnt" || umount -l "$loopmnt"; fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
  done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
set -E
trap 'echo "bench/cold.sh: line $LINENO failed: $BASH_COMMAND" >&2' ERR

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a-b}'; }
num() { [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]]; }
# ratio A B: A/B, or n/a
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a+0 > 0 && b+0 > 0) printf "%.2f", a/b; else printf "n/a"}'; }
# median V...: the median of the numeric values ("fail" when there is none)
median() {
  local v xs=()
  for v in "$@"; do num "$v" && xs+=("$v"); done
  [ ${#xs[@]} -eq 0 ] && { echo fail; return; }
  printf '%s\n' "${xs[@]}" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'
}
mibps() { awk -v b="$1" -v t="$2" 'BEGIN {if (t+0 > 0 && b+0 > 0) printf "%.1f", b/1048576/t; else printf "n/a"}'; } # BYTES SECS
per_gib() { awk -v x="$1" -v b="$2" 'BEGIN {if (b+0 > 0 && x != "fail") printf "%.2f", x/(b/1073741824); else printf "n/a"}'; } # X BYTES
mib() { awk -v b="$1" 'BEGIN {if (b+0 > 0) printf "%.1f", b/1048576; else printf "n/a"}'; }
rows=()
row() { rows+=("$(printf '%-58s %12s %12s %7s  %s' "$@")"); } # LABEL INCFS BASELINE RATIO RATIO-MEANING
notes=()
note() { notes+=("$*"); echo "  $*" >&2; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -s -o /dev/null --max-time 2 "$1" && return 0; sleep 0.05; done; return 1; }
mounted() { grep -q " $1 fuse" /proc/mounts; }
# wait_gone PID: wait up to 10 s for a process to exit, then kill it.
wait_gone() { for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done; kill "$1" 2>/dev/null || true; }
json_field() { { "$INCFS" status "$1" --json | "$PY" -c 'import json, sys; print(json.load(sys.stdin).get(sys.argv[1]))' "$2"; } 2>/dev/null || echo n/a; }
machine_busy() { awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8}' /proc/stat; } # user+nice+system+irq+softirq ticks, all cores
cpu_ticks() { awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$1/stat" 2>/dev/null || echo n/a; } # utime+stime of PID
vm_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status" 2>/dev/null || echo n/a; }            # PID VmHWM|VmRSS
kib2mib() { awk -v k="$1" 'BEGIN {if (k+0 > 0) printf "%.1f", k/1024; else printf "n/a"}'; }
CLK_TCK=$(getconf CLK_TCK)

# timed CMD...: run CMD (stdout to $work/last.out, stderr to $work/last.err); sets T_REAL (wall
# seconds, or "fail") and T_CPU (user+sys seconds of CMD and its children); returns CMD's status.
timed() {
  local TIMEFORMAT='%3R %3U %3S' rc=0 u s
  { time "$@" > "$work/last.out" 2> "$work/last.err"; } 2> "$work/last.time" || rc=$?
  read -r T_REAL u s < <(tail -1 "$work/last.time")
  T_CPU=$(awk -v u="$u" -v s="$s" 'BEGIN {printf "%.3f", u+s}')
  [ $rc -eq 0 ] || T_REAL=fail
  return $rc
}

# The cold read: cat of the file into /dev/null, as curl's bytes go to /dev/null (through
# `timed`, stdout is a file in $work: a read timed that way also paid for writing 1 GiB to disk,
# ~0.3-0.5 s of the loopback figure until 2026-12-06).
CAT_NULL='exec cat -- "$1" > /dev/null'

# incfs_mount NAME URL [options...]: mount at $work/mnt-NAME with a fresh cache $work/cache-NAME;
# sets DPID (the daemon) and T_MOUNT (seconds until `incfs mount` returned).
incfs_mount() {
  local name=$1 url=$2 t0 t1
  shift 2
  local m=$work/mnt-$name c=$work/cache-$name
  DPID= T_MOUNT=fail
  rm -rf "$c"
  mkdir -p "$m"
  t0=$(now)
  if ! timeout 120 "$INCFS" mount "$url" "$m" --trust "$work/key.pub.pem" --cache "$c" "$@" > "$work/mount-$name.out" 2>&1; then
    note "mount $name failed: $(tail -1 "$work/mount-$name.out")"
    return 1
  fi
  t1=$(now)
  T_MOUNT=$(sub "$t1" "$t0")
  DPID=$(sed -n 's/.*daemon pid \([0-9]*\).*/\1/p' "$work/mount-$name.out")
  [ -n "$DPID" ] || { note "mount $name: no daemon pid in: $(cat "$work/mount-$name.out")"; return 1; }
  pids+=("$DPID")
}
incfs_unmount() { # incfs_unmount NAME: unmount $work/mnt-NAME and wait for its daemon to exit
  local m=$work/mnt-$1
  if mounted "$m"; then "$INCFS" unmount "$m" >/dev/null 2>&1 || umount "$m" 2>/dev/null || umount -l "$m"; fi
  [ -n "${DPID:-}" ] && wait_gone "$DPID"
  return 0
}

# ---------------------------------------------------------------------------------------------
echo "== setup" >&2
src=$work/src
mkdir -p "$src/big" "$src/stdlib" "$work/www"
big=$src/big/file.bin
big_bytes=$((1 << 30))
half=$((big_bytes / 2))
head -c $half /dev/urandom > "$big"
# Compressible but not deduplicable: numbered lines, so that no two 4 KiB blocks are equal.
{ seq -f '%012.0f the quick brown fox jumps over the lazy dog; compressible text line' 1 7000000 || true; } |
  head -c $half >> "$big"
[ "$(stat -c %s "$big")" = $big_bytes ] || { echo "the 1 GiB file came out $(stat -c %s "$big") bytes" >&2; exit 1; }
stdlib=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
tar -C "$stdlib" --exclude=./site-packages --exclude=./test -cf - . | tar -C "$src/stdlib" -xf -
"$INCFS" keygen --out "$work/key" >/dev/null
t0=$(now)
"$INCFS" pack "$src" "$work/www/repo" --key "$work/key.pem" > "$work/pack.out" 2>&1 </dev/null ||
  { echo "pack failed: $(cat "$work/pack.out")" >&2; exit 1; }
t_pack=$(sub "$(now)" "$t0")
objects=("$work"/www/repo/objects/*)
obj_bytes=$(cat "${objects[@]}" | wc -c)
src_bytes=$(du -sb --apparent-size "$src" | cut -f1)
note "repository: $(mib "$src_bytes") MiB of files packed in $t_pack s into ${#objects[@]} objects of $(mib "$obj_bytes") MiB in all ($(sed -n 's/^ *stored: *//p' "$work/pack.out"))"

# One nginx serving $work/www on 127.0.0.1; a log line per request: status, body bytes, URI.
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
  log_format bench '\$status \$body_bytes_sent \$request_uri';
  access_log $ng/access.log bench;
  client_body_temp_path $ng;
  proxy_temp_path $ng;
  fastcgi_temp_path $ng;
  uwsgi_temp_path $ng;
  scgi_temp_path $ng;
  tcp_nodelay on;
  server {
    listen 127.0.0.1:$port;
    root $work/www;
  }
}
EOF
nginx -c "$ng/nginx.conf" -p "$ng" 2>/dev/null &
pids+=($!)
url=http://127.0.0.1:$port
wait_http "$url/repo/manifest" || { echo "nginx did not start: $(cat "$ng/error.log")" >&2; exit 1; }
pport=$(free_port)
"$DELAY_PROXY" "$pport" "$port" 20 &
pids+=($!)
url20=http://127.0.0.1:$pport
wait_http "$url20/repo/manifest" || { echo "delay proxy did not start" >&2; exit 1; }
log_lines() { wc -l < "$ng/access.log"; }
# log_since N: "REQUESTS BYTES" of the access log lines after line N
log_since() { tail -n +$(($1 + 1)) "$ng/access.log" | awk '{n++; b += $2} END {printf "%d %d\n", n, b}'; }

# curl_objects BASE: fetch every object of the repository at BASE with one curl (keep-alive, one
# after the other, like a plain download of the image); sets T_REAL, T_CPU and C_BYTES.
curl_objects() {
  local args=() o
  for o in "${objects[@]}"; do args+=(-o /dev/null "$1/objects/${o##*/}"); done
  C_BYTES=0 C_BUSY=
  local s0
  s0=$(machine_busy)
  timed curl -sS --fail --max-time 600 -w '%{size_download}\n' "${args[@]}" || { note "curl of the objects failed: $(tail -1 "$work/last.err")"; return 0; }
  C_BUSY=$(awk -v a="$s0" -v b="$(machine_busy)" -v t="$CLK_TCK" -v r="$T_REAL" 'BEGIN {if (r+0 > 0) printf "%.2f", (b-a)/t/r; else printf "n/a"}')
  C_BYTES=$(awk '{s += $1} END {printf "%d", s}' "$work/last.out")
}

# ---------------------------------------------------------------------------------------------
echo "== 1, 2. cold sequential read of the 1 GiB file ($RUNS runs)" >&2
# cold_read NAME URL: fresh mount (--background off), page cache dropped, cat the file. Sets
# R_T (seconds or fail), R_CPU (daemon utime+stime seconds), R_HWM (daemon VmHWM, KiB),
# R_REQ/R_FETCHED (the daemon's fetch requests and bytes fetched), R_REQS/R_BYTES (nginx's).
cold_read() {
  local name=$1 c0 c1 l0
  R_T=fail R_CPU= R_HWM= R_REQ= R_FETCHED= R_REQS= R_BYTES= R_BUSY=
  l0=$(log_lines)
  incfs_mount "$name" "$2/repo" --background off || return 0
  drop
  [ -z "${WARM_SERVER:-}" ] || warm_server
  c0=$(cpu_ticks "$DPID")
  s0=$(machine_busy)
  if timed timeout 900 sh -c "$CAT_NULL" sh "$work/mnt-$name/big/file.bin"; then R_T=$T_REAL; else note "cold read $name failed: $(tail -1 "$work/last.err")"; fi
  s1=$(machine_busy)
  c1=$(cpu_ticks "$DPID")
  # Cores busy on average during the read (every process: daemon, cat, nginx, proxy, kernel).
  R_BUSY=$(awk -v a="$s0" -v b="$s1" -v t="$CLK_TCK" -v r="$R_T" 'BEGIN {if (r+0 > 0) printf "%.2f", (b-a)/t/r; else printf "n/a"}')
  R_CPU=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" 'BEGIN {if (a ~ /^[0-9]+$/ && b ~ /^[0-9]+$/) printf "%.2f", (b-a)/t; else printf "n/a"}')
  R_HWM=$(vm_kib "$DPID" VmHWM)
  R_REQ=$(json_field "$work/mnt-$name" fetch_requests)
  R_FETCHED=$(json_field "$work/mnt-$name" bytes_fetched)
  read -r R_REQS R_BYTES < <(log_since "$l0")
  incfs_unmount "$name"
}
# The python import workload (5), defined here for COMPARE_ON=py20 too.
imports="import json, email.parser, http.client, decimal, csv, argparse, logging, unittest, asyncio, xml.dom.minidom"
# -B: no bytecode written, so that the local copy stays the packed tree (the .pyc files are in it)
workload() { timeout 300 "$PY" -B -I -S -c "import sys; sys.path.insert(0, '$1'); $imports; assert json.__file__.startswith('$1'), json.__file__"; }
# py_mount NAME URL [options]: fresh mount, page cache dropped, time the workload; sets P_T,
# P_CPU (daemon utime+stime seconds during it), P_HWM (daemon VmHWM, KiB), P_REQ (daemon fetch
# requests), P_NG_MOUNT / P_NG_RUN ("REQUESTS BYTES" nginx served during the mount / during the
# workload).
py_mount() {
  local name=$1 u=$2 l0 l1 c0
  shift 2
  P_T=fail P_CPU= P_HWM= P_REQ= P_NG_MOUNT= P_NG_RUN=
  l0=$(log_lines)
  incfs_mount "$name" "$u/repo" "$@" || return 0
  drop
  l1=$(log_lines)
  c0=$(cpu_ticks "$DPID")
  if timed workload "$work/mnt-$name/stdlib"; then P_T=$T_REAL; else note "5: workload on $name failed: $(tail -1 "$work/last.err")"; fi
  P_CPU=$(awk -v a="$c0" -v b="$(cpu_ticks "$DPID")" -v t="$CLK_TCK" 'BEGIN {if (a != "n/a" && b != "n/a") printf "%.2f", (b-a)/t; else printf "n/a"}')
  P_HWM=$(vm_kib "$DPID" VmHWM)
  P_REQ=$(json_field "$work/mnt-$name" fetch_requests)
  # Lines l0+1..l1 (sed, not tail | head: head stopping early fails the pipe under pipefail).
  if [ "$l1" -gt "$l0" ]; then
    P_NG_MOUNT=$(sed -n "$((l0 + 1)),${l1}p" "$ng/access.log" | awk '{n++; b += $2} END {printf "%d %d\n", n, b}')
  else
    P_NG_MOUNT="0 0"
  fi
  P_NG_RUN=$(log_since "$l1")
  incfs_unmount "$name"
}
# COMPARE=OTHER: paired A/B of one measure only, this binary (A) against OTHER (B), PAIRS pairs,
# the order alternating within pairs; each pair's ratios, then their medians. COMPARE_ON says
# which: cold (default: the loopback cold read, time and daemon CPU) or py20 (the python
# workload with default settings at 20 ms RTT, time; "CPU" is then the daemon's for the run).
if [ -n "${COMPARE:-}" ]; then
  A=$INCFS B=$(realpath -m -- "$COMPARE")
  [ -x "$B" ] || { echo "COMPARE=$COMPARE: not an executable" >&2; exit 1; }
  on=${COMPARE_ON:-cold}
  case $on in cold | py20) ;; *) echo "COMPARE_ON=$on: cold or py20" >&2; exit 1 ;; esac
  echo "== A/B: A=$A, B=$B, ${PAIRS:-6} pairs, $on" >&2
  tr=() cr=()
  for p in $(seq "${PAIRS:-6}"); do
    order=(A B)
    [ $((p % 2)) = 0 ] && order=(B A)
    for which in "${order[@]}"; do
      if [ "$which" = A ]; then INCFS=$A; else INCFS=$B; fi
      if [ "$on" = cold ]; then
        cold_read "ab$which" "$url"
      else
        py_mount "ab$which" "$url20"
        R_T=$P_T R_CPU=$P_CPU R_HWM=$P_HWM R_BUSY=
      fi
      declare "t_$which=$R_T" "c_$which=$R_CPU"
      echo "  pair $p $which: ${R_T} s, daemon cpu ${R_CPU} s,${R_BUSY:+ $R_BUSY cores busy,} VmHWM ${R_HWM} KiB" >&2
    done
    tr+=("$(ratio "$t_A" "$t_B")") cr+=("$(ratio "$c_A" "$c_B")")
  done
  INCFS=$A
  echo "A/B time ratios (A/B, lower: A faster): ${tr[*]}; median $(median "${tr[@]}")"
  echo "A/B daemon CPU ratios (A/B, lower: A cheaper): ${cr[*]}; median $(median "${cr[@]}")"
  exit 0
fi
# The server's files read into the page cache (nginx then serves from memory, as a CDN would):
# the pair read this way does not follow the VM's disk, whose speed varies from run to run.
warm_server() { cat "${objects[@]}" > /dev/null; }
c0_t=() c0_cpu=() c0_b=() c20_t=() c20_b=() busy_c0=() busy_i0=() busy_c20=() busy_i20=()
w_c=() w_i=() w_b=()
i0_t=() i0_cpu=() i0_hwm=() i0_req=() i0_fetched=() i20_t=() i20_req=() i20_fetched=()
for r in $(seq "$RUNS"); do
  drop; curl_objects "$url/repo"
  c0_t+=("$T_REAL") c0_cpu+=("$T_CPU") c0_b+=("$C_BYTES")
  cold_read cold0 "$url"
  i0_t+=("$R_T") i0_cpu+=("$R_CPU") i0_hwm+=("$R_HWM") i0_req+=("$R_REQ") i0_fetched+=("$R_FETCHED")
  busy_c0+=("$C_BUSY") busy_i0+=("$R_BUSY")
  echo "  run $r loopback: curl ${c0_t[-1]} s ($C_BUSY cores busy), incfs ${R_T} s (daemon cpu ${R_CPU} s, $R_BUSY of $(nproc) cores busy, VmHWM ${R_HWM} KiB, $R_REQ requests, nginx $R_REQS requests / $R_BYTES bytes)" >&2
  drop; curl_objects "$url20/repo"
  c20_t+=("$T_REAL") c20_b+=("$C_BYTES")
  cold_read cold20 "$url20"
  i20_t+=("$R_T") i20_req+=("$R_REQ") i20_fetched+=("$R_FETCHED")
  busy_c20+=("$C_BUSY") busy_i20+=("$R_BUSY")
  echo "  run $r 20 ms RTT: curl ${c20_t[-1]} s ($C_BUSY cores busy), incfs ${R_T} s ($R_BUSY of $(nproc) cores busy, $R_REQ requests, nginx $R_REQS requests / $R_BYTES bytes)" >&2
  drop; warm_server; curl_objects "$url/repo"
  w_c+=("$T_REAL") w_b+=("$C_BYTES")
  WARM_SERVER=1 cold_read warm0 "$url"
  w_i+=("$R_T")
  echo "  run $r loopback, server's page cache warm: curl ${w_c[-1]} s ($C_BUSY cores busy), incfs ${R_T} s (daemon cpu ${R_CPU} s, $R_BUSY of $(nproc) cores busy)" >&2
done
t_c0=$(median "${c0_t[@]}") b_c0=$(median "${c0_b[@]}")
row "1  cold sequential read, 1 GiB file (fresh mount, --background off)" "incfs" "curl" "ratio" ""
# Three pairs: loopback, 20 ms RTT, and loopback with the server's files in the page cache.
for pair in 0 20 warm; do
  unset -n it ct cb
  case $pair in
    0) lbl="loopback"; declare -n it=i0_t ct=c0_t cb=c0_b ;;
    20) lbl="20 ms RTT"; declare -n it=i20_t ct=c20_t cb=c20_b ;;
    warm) lbl="loopback, server's page cache warm"; declare -n it=w_i ct=w_c cb=w_b ;;
  esac
  ti=$(median "${it[@]}") tc=$(median "${ct[@]}") bc=$(median "${cb[@]}")
  mi=$(mibps $big_bytes "$ti") mc=$(mibps "$bc" "$tc")
  row "   $lbl: MiB/s (incfs: of 1 GiB file; curl: of objects)" "$mi" "$mc" "$(ratio "$mi" "$mc")" "incfs/curl MiB/s"
  row "   $lbl: seconds (incfs: cat file; curl: all objects)" "$ti" "$tc" "$(ratio "$tc" "$ti")" "curl/incfs time"
  # Each run's curl and incfs read back to back: the median of those ratios is steadier than
  # the ratio of medians when the machine's speed drifts from run to run (curl alone varied
  # 0.4-1.2 s between runs of one bench on a 2-core VM).
  pairs=()
  for k in $(seq 0 $((RUNS - 1))); do
    pairs+=("$(ratio "$(mibps $big_bytes "${it[$k]}")" "$(mibps "${cb[$k]}" "${ct[$k]}")")")
  done
  row "   $lbl: MiB/s ratio of each run's pair, median (runs: ${pairs[*]})" "" "" "$(median "${pairs[@]}")" "incfs/curl MiB/s"
done
unset -n it ct cb
note "1: the file is 1024 MiB (512 MiB random, 512 MiB text); curl fetched $(mib "$b_c0") MiB of objects (all ${#objects[@]}, stdlib included); incfs fetched $(mib "$(median "${i0_fetched[@]}")") MiB in $(median "${i0_req[@]}") requests at loopback, $(mib "$(median "${i20_fetched[@]}")") MiB in $(median "${i20_req[@]}") requests at 20 ms RTT"
note "1: cores busy on average during each command (all processes, of $(nproc)), median: loopback curl $(median "${busy_c0[@]}"), incfs $(median "${busy_i0[@]}"); 20 ms RTT curl $(median "${busy_c20[@]}"), incfs $(median "${busy_i20[@]}") (near $(nproc): the machine's CPU, not the network, sets the pace)"
cpu_i=$(median "${i0_cpu[@]}") cpu_c=$(median "${c0_cpu[@]}") hwm=$(median "${i0_hwm[@]}")
cpu_i_gib=$(per_gib "$cpu_i" $big_bytes) cpu_c_gib=$(per_gib "$cpu_c" "$b_c0")
row "2  CPU seconds per GiB, loopback cold read" "incfs" "curl" "ratio" ""
row "   daemon utime+stime per GiB of file vs curl per GiB fetched" "$cpu_i_gib" "$cpu_c_gib" "$(ratio "$cpu_i_gib" "$cpu_c_gib")" "incfs/curl (lower better)"
row "   daemon peak RSS after the read, VmHWM (MiB)" "$(kib2mib "$hwm")" "" "" ""

# ---------------------------------------------------------------------------------------------
if [ "$PERF" = 1 ]; then
  echo "== 3. perf profile of one more loopback cold read" >&2
  mkdir -p bench/out
  incfs_mount perf "$url/repo" --background off
  drop
  perf record -g -p "$DPID" -o "$work/perf.data" > "$work/perf-record.log" 2>&1 &
  perfpid=$!
  pids+=("$perfpid")
  sleep 1 # perf attaches to the daemon's threads
  timed timeout 900 sh -c "$CAT_NULL" sh "$work/mnt-perf/big/file.bin" || note "perf run: cold read failed"
  t_perf=$T_REAL
  kill -INT "$perfpid" 2>/dev/null || true
  for _ in $(seq 600); do kill -0 "$perfpid" 2>/dev/null || break; sleep 0.1; done
  wait "$perfpid" 2>/dev/null || true
  incfs_unmount perf
  # Kept for a closer look (perf report -i bench/out/perf-cold.data --children ...).
  cp "$work/perf.data" bench/out/perf-cold.data 2>/dev/null || true
  {
    echo "# $header"
    echo "# perf record -g -p DAEMON during a cold loopback read of the 1 GiB file ($t_perf s)"
    echo "# perf report --no-children --percent-limit 2 --stdio | head -80"
    timeout 300 perf report -i "$work/perf.data" --no-children --percent-limit 2 --stdio 2>/dev/null | head -80 || true
    echo
    echo "# flat, all threads together: perf report --no-children -g none --sort dso,sym --percent-limit 0.5 --stdio | head -60"
    timeout 300 perf report -i "$work/perf.data" --no-children -g none --sort dso,sym --percent-limit 0.5 --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -60 || true
    echo
    echo "# by thread and library: perf report --no-children -g none --sort comm,dso --stdio"
    timeout 300 perf report -i "$work/perf.data" --no-children -g none --sort comm,dso --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -30 || true
  } > bench/out/perf-cold.txt
  note "3: perf: cold read took $t_perf s under perf record; report in bench/out/perf-cold.txt ($(wc -l < bench/out/perf-cold.txt) lines), data in bench/out/perf-cold.data"
fi

# ---------------------------------------------------------------------------------------------
echo "== 4. background completion ($RUNS runs)" >&2
bg_t=() bg_mount=() bg_fetched=()
for r in $(seq "$RUNS"); do
  drop
  t0=$(now)
  incfs_mount bg "$url/repo" --passthrough off || { bg_t+=(fail); continue; }
  done_at=
  for _ in $(seq 6000); do # 0.1 s polls, at most 10 minutes
    if "$INCFS" status "$work/mnt-bg" --json 2>/dev/null | grep -q '"complete": *true'; then done_at=$(now); break; fi
    sleep 0.1
  done
  if [ -n "$done_at" ]; then bg_t+=("$(sub "$done_at" "$t0")"); else bg_t+=(fail); note "4: run $r not complete after 10 minutes"; fi
  bg_mount+=("$T_MOUNT") bg_fetched+=("$(json_field "$work/mnt-bg" bytes_fetched)")
  echo "  run $r: complete after ${bg_t[-1]} s (mount $T_MOUNT s)" >&2
  incfs_unmount bg
done
t_bg=$(median "${bg_t[@]}")
row "4  background completion, loopback (s)" "incfs" "curl" "ratio" ""
row "   mount until status complete vs curl of all objects" "$t_bg" "$t_c0" "$(ratio "$t_c0" "$t_bg")" "curl/incfs time"
row "   the same as MiB/s of object bytes" "$(mibps "$obj_bytes" "$t_bg")" "$(mibps "$b_c0" "$t_c0")" "$(ratio "$t_c0" "$t_bg")" "incfs/curl MiB/s"
note "4: --background on (default), --passthrough off; time from running incfs mount (median $(median "${bg_mount[@]}") s of it) to \"complete\": true, polled every 0.1 s; incfs fetched $(mib "$(median "${bg_fetched[@]}")") MiB for $(mib "$obj_bytes") MiB of objects"

# ---------------------------------------------------------------------------------------------
echo "== 5. python import workload ($RUNS runs each)" >&2
py_local=()
for _ in $(seq "$RUNS"); do drop; timed workload "$src/stdlib" || note "5: local workload failed: $(tail -1 "$work/last.err")"; py_local+=("$T_REAL"); done
t_py_local=$(median "${py_local[@]}")
py_off0=() py_off20=() py_on20=() ng_run=() ng_runb=() ng_mnt=() ng_mntb=() req_off20=()
for r in $(seq "$RUNS"); do
  py_mount pyoff0 "$url" --background off
  py_off0+=("$P_T")
  py_mount pyoff20 "$url20" --background off
  py_off20+=("$P_T") req_off20+=("$P_REQ")
  read -r a b <<< "$P_NG_RUN"; ng_run+=("$a") ng_runb+=("$b")
  read -r a b <<< "$P_NG_MOUNT"; ng_mnt+=("$a") ng_mntb+=("$b")
  py_mount pyon20 "$url20"
  py_on20+=("$P_T")
  echo "  run $r: local ${py_local[$((r - 1))]} s, off/0 ms ${py_off0[-1]} s, off/20 ms ${py_off20[-1]} s (nginx: ${ng_run[-1]} requests / ${ng_runb[-1]} bytes during the workload, ${ng_mnt[-1]} / ${ng_mntb[-1]} during the mount), on/20 ms ${py_on20[-1]} s" >&2
done
row "5  python imports from a fresh mount (s, python run only)" "incfs" "local" "ratio" ""
row "   --background off, loopback" "$(median "${py_off0[@]}")" "$t_py_local" "$(ratio "$(median "${py_off0[@]}")" "$t_py_local")" "incfs/local time"
row "   --background off, 20 ms RTT" "$(median "${py_off20[@]}")" "$t_py_local" "$(ratio "$(median "${py_off20[@]}")" "$t_py_local")" "incfs/local time"
row "   default (background on), 20 ms RTT" "$(median "${py_on20[@]}")" "$t_py_local" "$(ratio "$(median "${py_on20[@]}")" "$t_py_local")" "incfs/local time"
row "   nginx served during the off/20 ms workload: requests, MiB" "$(median "${ng_run[@]}")" "$(mib "$(median "${ng_runb[@]}")")" "" "(not a ratio)"
note "5: off/20 ms run: nginx served $(median "${ng_run[@]}") requests, $(median "${ng_runb[@]}") bytes during the workload (daemon's fetch_requests: $(median "${req_off20[@]}")), and $(median "${ng_mnt[@]}") requests, $(median "${ng_mntb[@]}") bytes during the mount before it; local = the same stdlib tree on /var/tmp, page cache dropped; python $("$PY" -c 'import platform; print(platform.python_version())') run with -B -I -S"

# ---------------------------------------------------------------------------------------------
if [ "$SKIP_SCALE" != 1 ]; then
  echo "== 6. 100,000-file image ($RUNS runs)" >&2
  # On an ext4 image of its own (mounted without discard), so that removing it takes no minutes.
  ssrc=$work/scale
  mkdir -p "$ssrc"
  truncate -s 1G "$work/scale.img"
  mkfs.ext4 -q -F -N 131072 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$work/scale.img"
  mount -o loop "$work/scale.img" "$ssrc"
  loopmnt=$ssrc
  rmdir "$ssrc/lost+found"
  "$PY" - "$ssrc" <<'EOF'
import os, sys
root = sys.argv[1]
for d in range(100):
    p = os.path.join(root, f"d{d:03}")
    os.mkdir(p)
    for f in range(1000):
        line = f"{d:03}/f{f:04} "  # every file different: no deduplication
        with open(os.path.join(p, f"f{f:04}"), "w") as fh:
            fh.write((line * 12)[:99] + "\n")
EOF
  t0=$(now)
  "$INCFS" pack "$ssrc" "$work/www/scale" --key "$work/key.pem" > "$work/pack-scale.out" 2>&1 </dev/null ||
    { echo "pack of the 100k tree failed: $(tail -3 "$work/pack-scale.out")" >&2; exit 1; }
  t_spack=$(sub "$(now)" "$t0")
  man_bytes=$(stat -c %s "$work/www/scale/manifest")
  n_local=$(find "$ssrc" | wc -l)
  s_mount=() s_find=() s_man=() s_lfind=() s_rss=() s_hwm=() s_n=()
  for r in $(seq "$RUNS"); do
    drop; timed curl -sS --fail --max-time 120 -o /dev/null "$url/scale/manifest"; s_man+=("$T_REAL")
    drop; timed sh -c "find '$ssrc' | wc -l"; s_lfind+=("$T_REAL")
    incfs_mount scale "$url/scale" --background off || { s_mount+=(fail) s_find+=(fail); continue; }
    s_mount+=("$T_MOUNT")
    drop
    if timed timeout 600 sh -c "find '$work/mnt-scale' | wc -l"; then s_find+=("$T_REAL"); s_n+=("$(cat "$work/last.out")"); else s_find+=(fail); note "6: find failed: $(tail -1 "$work/last.err")"; fi
    s_rss+=("$(vm_kib "$DPID" VmRSS)") s_hwm+=("$(vm_kib "$DPID" VmHWM)")
    echo "  run $r: mount ${s_mount[-1]} s, find ${s_find[-1]} s (${s_n[-1]:-?} entries), VmRSS ${s_rss[-1]} KiB, VmHWM ${s_hwm[-1]} KiB" >&2
    incfs_unmount scale
  done
  row "6  100,000 files of 100 B (100 dirs x 1000), --background off" "incfs" "baseline" "ratio" ""
  row "   incfs mount returns (s) vs curl of the manifest" "$(median "${s_mount[@]}")" "$(median "${s_man[@]}")" "$(ratio "$(median "${s_mount[@]}")" "$(median "${s_man[@]}")")" "incfs/curl time"
  row "   find MNT | wc -l (s) vs the same on the local tree" "$(median "${s_find[@]}")" "$(median "${s_lfind[@]}")" "$(ratio "$(median "${s_find[@]}")" "$(median "${s_lfind[@]}")")" "incfs/local time"
  row "   daemon VmRSS after the find (MiB)" "$(kib2mib "$(median "${s_rss[@]}")")" "" "" ""
  row "   daemon VmHWM after the find (MiB)" "$(kib2mib "$(median "${s_hwm[@]}")")" "" "" ""
  note "6: packed in $t_spack s, manifest $man_bytes bytes, repository $(du -sb "$work/www/scale" | cut -f1) bytes; find listed $(median "${s_n[@]}") entries through the mount, $n_local locally; page cache dropped before each find"
fi

# ---------------------------------------------------------------------------------------------
echo
echo "$header"
printf '%s\n' "${rows[@]}"
echo
echo "Median of $RUNS run(s); every incfs run on a fresh mount with a fresh cache, page cache dropped"
echo "before each timed command (curl included). loopback = nginx on 127.0.0.1 directly; 20 ms RTT ="
echo "through tools/delay-proxy. Ratios: higher is better where the baseline is curl's speed (1.00 ="
echo "as fast as curl), lower is better for incfs/local times and CPU (1.00 = as fast as local disk)."
printf '%s\n' "${notes[@]}"
echo "run time: $(( $(date +%s) - start )) s"
