#!/usr/bin/env bash
# A/A soak of the real binary on a busy machine: ten one-minute runs of
# `veer run` with config.example.toml's judge settings in front of two
# identical loopback upstreams, under keyed load, while two busy loops load
# both cores. Prints a table and how many runs reverted the canary (goal 0).
#
# usage: benches/aa-soak.sh [--runs N] [--seconds S] [--rate R] [--mirror PERCENT]
#                           [--tail N] [--tail-ms MS] [--patience MS]
# Only 127.0.0.1 is targeted; the hog and every run are bounded in time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
cargo build --release --locked -p veer-proxy --bin veer -p veer-benches --bin aa-soak
hog_pids=()
cleanup() { for p in "${hog_pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for _ in 1 2; do
  timeout 3600 sh -c 'while :; do :; done' &
  hog_pids+=($!)
done
echo "CPU hog: ${#hog_pids[@]} busy loops (pids ${hog_pids[*]})"
target/release/aa-soak target/release/veer "$@"
