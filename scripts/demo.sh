#!/usr/bin/env bash
# Quick start, step 1: build incfs and run the whole job end to end on the built-in sample
# (make a key, pack, serve on 127.0.0.1, verify and extract over HTTP, compare).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --locked -p incfs-cli
exec target/release/incfs demo "$@"
