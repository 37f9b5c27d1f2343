#!/usr/bin/env bash
# A profile-guided (PGO) build of veer, to measure what code layout buys:
# an instrumented release build, trained by D seconds of the peers' load
# (wrk, 50 connections, GETs with random x-user-id keys through one route
# with a canary at 20 % and the judge on, to the shared peers' nginx
# origin), its profile merged with the toolchain's llvm-profdata, and a
# release build that uses it. Prints the PGO binary's path; compare it
# with `CACHESIM=1 benches/request-cost.sh N target/release/veer BIN` and
# `benches/peers.sh ... "veer-pgo=127.0.0.1:PORT=BIN run --config CFG"`.
#
# The profile is of that one load (a 3-byte GET path): code it does not
# run is laid out as cold. This is a measurement, not how veer is built.
#
# usage: benches/pgo.sh [D]   (default 20 seconds)
# env: OUT=dir (default /tmp/veer-pgo), BASE_PORT (default 19280),
# TRAIN=demo: PGO=1 deploy/build-veer.sh's build instead (trained
# by `veer demo --duration D`: its own upstreams and clients, GETs with
# sticky keys, a canary that turns bad and is reverted; no nginx or wrk).
# Needs the llvm-tools rustup component (`rustup component add
# llvm-tools`), nginx and wrk. Only 127.0.0.1 is targeted; the load is
# bounded by wrk's duration and timeout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dur="${1:-20}"
out="${OUT:-/tmp/veer-pgo}"
host=$(rustc -vV | awk '/^host:/ {print $2}')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
[ -x "$profdata" ] || { echo "llvm-profdata not found: rustup component add llvm-tools" >&2; exit 1; }
train="${TRAIN:-wrk}"
if [ "$train" = wrk ]; then
  for tool in nginx wrk; do
    command -v "$tool" > /dev/null || { echo "$tool is needed" >&2; exit 1; }
  done
fi
peers="$ROOT/../shared/bench/peers"
[ "$train" = demo ] || [ -d "$peers" ] || { echo "peer configs not found: $peers" >&2; exit 1; }
mkdir -p "$out"
rm -rf "$out/raw" "$out/merged.profdata"

# --target keeps RUSTFLAGS off build scripts and proc macros.
build() { # target-dir rustflags
  (cd "$ROOT" && RUSTFLAGS="$2" CARGO_TARGET_DIR="$1" \
    cargo build --release --locked --target "$host" -q -p veer-proxy --bin veer)
}
if [ "$train" = demo ]; then
  PGO=1 PGO_DIR="$out" TRAIN_SECONDS="$dur" "$ROOT/deploy/build-veer.sh" "$host" "$out/veer"
  echo "$out/veer"
  exit 0
fi
echo "instrumented build..." >&2
build "$out/target-gen" "-Cprofile-generate=$out/raw"

# shellcheck source=benches/pinned-lib.sh
. "$ROOT/benches/pinned-lib.sh"
pinned_run "${BASE_PORT:-19280}"
start_origin
veer_config enforce
RUST_LOG=warn "$out/target-gen/$host/release/veer" run --config "$work/veer.toml" > "$work/veer.log" 2>&1 &
veer=$!
pids+=("$veer")
wait_ports "$stable" "$port"
echo "training: ${dur}s of load..." >&2
timeout $((dur + 30)) wrk -t1 -c50 -d"${dur}s" -s "$work/wrk-userid.lua" "http://127.0.0.1:$port/" \
  | awk '/^Requests\/sec/ {print "training req/s: " $2}' >&2
# The profile is written when veer exits: stop it as an orchestrator does.
kill -TERM "$veer"
wait "$veer" || true
if ! ls "$out/raw"/*.profraw > /dev/null 2>&1; then
  echo "no profile written; veer's log ends:" >&2
  tail -5 "$work/veer.log" >&2
  exit 1
fi
"$profdata" merge -o "$out/merged.profdata" "$out/raw"
echo "optimized build..." >&2
build "$out/target-use" "-Cprofile-use=$out/merged.profdata"
cp "$out/target-use/$host/release/veer" "$out/veer"
echo "$out/veer"
