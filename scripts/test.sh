#!/usr/bin/env bash
# Quick start, step 2: the whole test suite (formatting, lints, unit and integration tests).
# Integration tests need root (device nodes, nginx as root, setpriv) and the packages below.
set -euo pipefail
cd "$(dirname "$0")/.."
# fio: the load test; g++: libFuzzer, built by cargo fuzz.
scripts/deps.sh fio g++ python3-minimal
# Garage, a real S3-compatible store for the S3 tests: built once (about 8 minutes), then reused.
if ! command -v garage >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/garage" ]; then
  echo "building garage for the S3 tests (once)..." >&2
  cargo install garage --locked --quiet
fi
started=$(date +%s)
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# Every parser of untrusted input, fuzzed briefly (scripts/fuzz.sh 600 for a longer run).
scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
fuzz_status=$?
[ "$status" -ne 0 ] || status=$fuzz_status
set -e
# One closing line for the whole run (cargo prints one per test binary, the last often "0 passed").
echo "test suite took $(( $(date +%s) - started ))s"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
