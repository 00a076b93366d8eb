#!/usr/bin/env bash
# Benchmark of the publishing side, with baselines measured in the same run on the same tree:
#   pack (per codec)   vs  tar | zstd -3 / lz4 (same reading and compressing, as one stream)
#   incfs digest       vs  fsverity digest (the reference fs-verity hashing)
#   verify (dir, HTTP) vs  fsverity digest (hashing the plain files)
# Prints throughput in MB/s (10^6 bytes of file content per second), stored/original ratios
# and ours/baseline ratios. The tree is read once first so that every run reads from the
# page cache. Usage: bench/image.sh [TREE]   (default /usr/lib)
set -euo pipefail
cd "$(dirname "$0")/.."
TREE=$(realpath "${1:-/usr/lib}")
scripts/deps.sh zstd lz4
cargo build --release --locked -p incfs-cli >/dev/null 2>&1
INCFS=$PWD/target/release/incfs
work=$(mktemp -d /var/tmp/incfs-bench.XXXXXX)
srv=
cleanup() { [ -n "$srv" ] && kill "$srv" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

bytes=$(find "$TREE" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%.0f", s}')
files=$(find "$TREE" -type f | wc -l)
echo "tree: $TREE, $files files, $(awk -v b="$bytes" 'BEGIN {printf "%.1f", b/1e6}') MB; $(nproc) cores"
# Through cat: GNU tar writing to /dev/null itself skips reading file contents (not a warm-up).
tar -C "$TREE" -cf - . 2>/dev/null | cat >/dev/null || true

# secs CMD...: run CMD (output discarded) and print its wall time in seconds.
secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); awk -v s="$s" -v e="$e" 'BEGIN {printf "%.3f", e-s}'; }
mbps() { awk -v b="$bytes" -v t="$1" 'BEGIN {printf "%.0f", b/1e6/t}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }

"$INCFS" keygen --out "$work/key" >/dev/null
row() { printf '%-34s %10s %10s %12s\n' "$@"; }
row "measurement" "seconds" "MB/s" "vs baseline"

for codec in zstd lz4; do
  t=$(secs sh -c "tar -C '$TREE' -cf - . | $codec $( [ $codec = zstd ] && echo '-3 -T0' || echo '-1') -c > '$work/tar.$codec'")
  eval "base_${codec}_t=$t"
  eval "base_${codec}_size=$(stat -c %s "$work/tar.$codec")"
  row "baseline tar | $codec" "$t" "$(mbps "$t")" ""
done

t_fsv=$(secs sh -c "find '$TREE' -type f -print0 | xargs -0 -n 2000 fsverity digest --hash-alg=sha256 --block-size=4096")
row "baseline fsverity digest" "$t_fsv" "$(mbps "$t_fsv")" ""
t=$(secs sh -c "find '$TREE' -type f -print0 | xargs -0 -n 2000 '$INCFS' digest")
row "incfs digest" "$t" "$(mbps "$t")" "$(ratio "$t_fsv" "$t")x"

for codec in zstd lz4 none; do
  t=$(secs "$INCFS" pack "$TREE" "$work/repo-$codec" --key "$work/key.pem" --compression "$codec" -q)
  stored=$(du -sb "$work/repo-$codec/objects" | cut -f1)
  base=""
  [ "$codec" != none ] && base="$(ratio "$(eval echo \$base_${codec}_t)" "$t")x"
  row "pack --compression $codec" "$t" "$(mbps "$t")" "$base"
  eval "stored_$codec=$stored"
done

# A dictionary (format 4): trained on a sample of the tree, one object a client fetches once.
t=$(secs "$INCFS" pack "$TREE" "$work/repo-dict" --key "$work/key.pem" --dictionary -q)
stored_dict=$(du -sb "$work/repo-dict/objects" | cut -f1)
# The dictionary is the object that starts with zstd's dictionary magic (37 A4 30 EC).
dict_size=0
for o in $(find "$work/repo-dict/objects" -type f -size -1025k); do
  [ "$(head -c 4 "$o" | od -An -tx1 | tr -d ' ')" = 37a430ec ] && dict_size=$(stat -c %s "$o")
done
row "pack --compression zstd --dictionary" "$t" "$(mbps "$t")" "$(ratio "$base_zstd_t" "$t")x"

echo
printf '%-34s %12s %12s\n' "stored / original" "incfs" "tar|codec"
for codec in zstd lz4; do
  printf '%-34s %12s %12s\n' "$codec" "$(ratio "$(eval echo \$stored_$codec)" "$bytes")" "$(ratio "$(eval echo \$base_${codec}_size)" "$bytes")"
done
printf '%-34s %12s %12s\n' "zstd with a dictionary" "$(ratio "$stored_dict" "$bytes")" "$(ratio "$base_zstd_size" "$bytes")"
printf '%-34s %12s\n' "none (zero blocks dropped, + meta)" "$(ratio "$stored_none" "$bytes")"
printf '%-34s %12s\n' "dictionary: a client's first fetch" "$dict_size bytes"
printf '%-34s %12s %12s\n' "stored / tar|zstd size" "$(ratio "$stored_zstd" "$base_zstd_size")x" "dict: $(ratio "$stored_dict" "$base_zstd_size")x"

echo
t=$(secs "$INCFS" verify "$work/repo-zstd" --trust "$work/key.pub.pem" -q)
row "verify zstd repo, directory" "$t" "$(mbps "$t")" "$(ratio "$t_fsv" "$t")x"
"$INCFS" serve "$work/repo-zstd" --listen 127.0.0.1:0 > "$work/serve.out" 2>/dev/null &
srv=$!
for _ in $(seq 100); do grep -q http "$work/serve.out" 2>/dev/null && break; sleep 0.05; done
url=$(sed -n 's/.* at \(http[^ ]*\)/\1/p' "$work/serve.out")
t=$(secs "$INCFS" verify "$url" --trust "$work/key.pub.pem" -q)
row "verify zstd repo, incfs serve" "$t" "$(mbps "$t")" "$(ratio "$t_fsv" "$t")x"
t=$(secs "$INCFS" extract "$url" "$work/extracted" --trust "$work/key.pub.pem" -q)
row "extract zstd repo, incfs serve" "$t" "$(mbps "$t")" ""

# A sparse file: 1 GiB with 1 MiB of random data in the middle. Its metadata is what the objects
# hold beyond that 1 MiB (a compact map, format 3) against the dense region it replaces
# (32 bytes of tree and 16 of block map per 4 KiB block).
echo
mkdir -p "$work/sparse"
truncate -s 1G "$work/sparse/disk.img"
head -c 1M /dev/urandom | dd of="$work/sparse/disk.img" bs=1M seek=512 conv=notrunc status=none
t=$(secs "$INCFS" pack "$work/sparse" "$work/repo-sparse" --key "$work/key.pem" -q)
meta=$(( $(find "$work/repo-sparse/objects" -type f -printf '%s\n' | awk '{s+=$1} END {print s}') - (1 << 20) ))
blocks=$(( 1 << 18 ))
dense=$(( 32 * (blocks + blocks / 128 + blocks / 128 / 128) + 16 * blocks ))
printf '%-34s %12s %12s\n' "1 GiB sparse file, 1 MiB of data" "metadata" "dense layout"
printf '%-34s %12s %12s\n' "bytes (limit 65536)" "$meta" "$dense"
row "pack the sparse file" "$t" "" ""
