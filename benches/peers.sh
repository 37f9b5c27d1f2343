#!/usr/bin/env bash
# Loopback load benchmark: veer side by side with nginx and HAProxy, using the
# shared peer script (../shared/bench/peers.sh). Builds veer in release mode,
# writes a veer config matching the peers' split (x-user-id, fallback client
# IP; canary share -p), and passes veer as the extra target.
#
# usage: benches/peers.sh [peers.sh options]     e.g. benches/peers.sh -r 3 -d 10
# Only 127.0.0.1 is targeted; every run is bounded by wrk's duration.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PEERS="${PEERS:-$ROOT/../shared/bench/peers.sh}"
[ -x "$PEERS" ] || [ -f "$PEERS" ] || { echo "peer script not found: $PEERS"; exit 1; }

MODE=pinned PCT=20
args=("$@")
while getopts "m:r:d:c:t:p:b:ns" o; do
  case $o in m) MODE=$OPTARG ;; p) PCT=$OPTARG ;; *) ;; esac
done
WORKERS=1; [ "$MODE" = unpinned ] && WORKERS=2

export BASE_PORT=${BASE_PORT:-18080}
VEER_PORT=$((BASE_PORT + 13)) ADMIN_PORT=$((BASE_PORT + 14))
(cd "$ROOT" && cargo build --release --locked -p veer-proxy --bin veer)
CFG_DIR=$(mktemp -d /tmp/veer-bench.XXXXXX)
cat > "$CFG_DIR/veer.toml" <<TOML
[proxy]
listen = ["127.0.0.1:$VEER_PORT"]
workers = $WORKERS
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[state]
dir = "$CFG_DIR/state"

[[route]]
name = "bench"
sticky = ["header:x-user-id", "client-ip"]
[route.stable]
version = "stable"
endpoints = ["127.0.0.1:$((BASE_PORT + 1))"]
[route.canary]
version = "canary"
endpoints = ["127.0.0.1:$((BASE_PORT + 2))"]
weight = $PCT
TOML
echo "veer config: $CFG_DIR/veer.toml"
RUST_LOG=warn bash "$PEERS" "${args[@]}" \
  "veer=127.0.0.1:$VEER_PORT=$ROOT/target/release/veer run --config $CFG_DIR/veer.toml"
