#!/usr/bin/env bash
# Fuzz every parser of untrusted input (cargo fuzz, libFuzzer + AddressSanitizer).
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 10; CI runs this briefly, run it longer
# on demand: scripts/fuzz.sh 600). Seeds come from a real repository packed here.
# Prints one line per target: executions, and whether it found anything (exit 1 if so).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (once)..." >&2
  cargo install cargo-fuzz --locked --quiet
fi
# cargo fuzz needs -Z flags; this machine has only a stable toolchain.
export RUSTC_BOOTSTRAP=1
targets=(manifest block_map codec merkle_tree profile compact_map)

# Seed corpora from a real repository: this project's own sources, packed.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --quiet -p incfs-cli
incfs=target/debug/incfs
"$incfs" keygen --out "$work/key" >/dev/null
"$incfs" pack crates "$work/repo" --key "$work/key.pem" -q --compression lz4 >/dev/null
"$incfs" pack crates "$work/repo" --key "$work/key.pem" -q --compression zstd >/dev/null
printf 'incfs-profile 1\n0 3 incfs-cli/src/main.rs\n2 1 a\\x20b\n' > "$work/profile"
for t in "${targets[@]}"; do mkdir -p "fuzz/corpus/$t"; done
cp "$work"/repo/versions/*.manifest fuzz/corpus/manifest/
cp "$work/profile" fuzz/corpus/profile/seed
python3 - "$work/repo" <<'PY'
import os, sys, glob, struct
repo = sys.argv[1]
objs = sorted(glob.glob(os.path.join(repo, "objects", "*")))
data = open(objs[0], "rb").read()
# Codec seeds: every codec byte in front of a few stored pieces of a real object.
for i, off in enumerate(range(0, min(len(data), 64 << 10), 8 << 10)):
    for codec in range(4):
        open(f"fuzz/corpus/codec/seed-{i}-{codec}", "wb").write(bytes([codec]) + data[off:off + 4096])
# Block map and tree seeds: the tail of the object (metadata regions lie after their data).
tail = data[-(16 << 10):]
open("fuzz/corpus/block_map/seed", "wb").write(struct.pack("<Q", 1 << 20) + tail)
open("fuzz/corpus/merkle_tree/seed", "wb").write(struct.pack("<Q", 1 << 20) + bytes(32) + tail)
# Compact map seed: a 1 GiB file with two runs (a distinct block, then one repeated 300 times).
def run(first, count, leaf, offset):
    return struct.pack("<QQ", first, count) + bytes([leaf]) * 32 + struct.pack("<IBBHQ", 0, 1, 0, 4096, offset)
cmap = struct.pack("<Q", 2) + run(5, 1, 1, 0) + run(1000, 300, 2, 4096)
open("fuzz/corpus/compact_map/seed", "wb").write(struct.pack("<Q", (1 << 30) - 1) + cmap)
PY

found=0
for t in "${targets[@]}"; do
  log="$work/$t.log"
  if cargo fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -max_len=1048576 >"$log" 2>&1; then
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    [ -n "$execs" ] || execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    echo "fuzz $t: ${execs:-?} executions in ${secs}s, nothing found"
  else
    found=1
    echo "fuzz $t: FOUND A CRASH (input saved in fuzz/artifacts/$t; reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run $t FILE):"
    grep -E "panicked|ERROR:|SUMMARY|^ +#[0-9]+ .* in incfs" "$log" | head -20
  fi
done
exit "$found"
