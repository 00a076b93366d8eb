#!/usr/bin/env bash
# Quick start, step 2: the whole test suite (formatting, lints, unit and integration tests).
# Integration tests need root (device nodes, nginx as root, setpriv) and the packages below.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
started=$(date +%s)
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo test --locked --workspace
echo "test suite finished in $(( $(date +%s) - started ))s"
