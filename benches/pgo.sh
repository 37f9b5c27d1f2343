#!/usr/bin/env bash
# A profile-guided (PGO) build of veer trained by D seconds of the peers'
# load (wrk, 50 connections, GETs with random x-user-id keys through one
# route with a canary at 20 % and the judge on, to the shared peers' nginx
# origin), to measure what code layout buys on that path. The build
# itself is `PGO=1 deploy/build-veer.sh`'s (instrumented build, training,
# llvm-profdata merge, the build that uses the counts); this script only
# gives it another training run. Prints the PGO binary's path; compare it
# with `CACHESIM=1 benches/request-cost.sh N target/release/veer BIN` and
# `benches/peers.sh ... "veer-pgo=127.0.0.1:PORT=BIN run --config CFG"`.
#
# The profile is of that one load (a 3-byte GET path): code it does not
# run is laid out as cold. A measurement, not how veer is built.
#
# usage: benches/pgo.sh [D]   (default 20 seconds)
# env: OUT=dir (default /tmp/veer-pgo), BASE_PORT (default 19280),
# TRAIN=shipped: deploy/build-veer.sh's own training instead (pgo-train,
# every protocol veer serves, D seconds: no nginx or wrk needed).
# Needs nginx and wrk (and rustup's llvm-tools, which build-veer.sh adds).
# Only 127.0.0.1 is targeted; the load is bounded by wrk's duration and
# timeout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
peers="$ROOT/../shared/bench/peers"  # the peers' configs (pinned-lib.sh)

# Called back by build-veer.sh with the instrumented binary: the training.
if [ "${1:-}" = --train ]; then
  bin=$2 dur=$3
  # shellcheck source=benches/pinned-lib.sh
  . "$ROOT/benches/pinned-lib.sh"
  pinned_run "${BASE_PORT:-19280}"
  start_origin
  veer_config enforce
  RUST_LOG=warn "$bin" run --config "$work/veer.toml" > "$work/veer.log" 2>&1 &
  veer=$!
  pids+=("$veer")
  wait_ports "$stable" "$port"
  echo "training: ${dur}s of load..." >&2
  timeout $((dur + 30)) wrk -t1 -c50 -d"${dur}s" -s "$work/wrk-userid.lua" "http://127.0.0.1:$port/" \
    | awk '/^Requests\/sec/ {print "training req/s: " $2}' >&2
  # The counts are written when veer exits: stop it as an orchestrator does.
  kill -TERM "$veer"
  wait "$veer" || { echo "veer did not exit cleanly; its log ends:" >&2; tail -5 "$work/veer.log" >&2; exit 1; }
  exit 0
fi

dur="${1:-20}"
out="${OUT:-/tmp/veer-pgo}"
host=$(rustc -vV | awk '/^host:/ {print $2}')
train=()
if [ "${TRAIN:-wrk}" != shipped ]; then
  for tool in nginx wrk; do
    command -v "$tool" > /dev/null || { echo "$tool is needed" >&2; exit 1; }
  done
  [ -d "$peers" ] || { echo "peer configs not found: $peers" >&2; exit 1; }
  train=(TRAIN_WITH="$ROOT/benches/pgo.sh --train")
fi
env "${train[@]}" PGO=1 PGO_DIR="$out" TRAIN_SECONDS="$dur" \
  "$ROOT/deploy/build-veer.sh" "$host" "$out/veer"
echo "$out/veer"
