#!/usr/bin/env bash
# Loopback load benchmark: veer side by side with nginx and HAProxy, using the
# shared peer script (../shared/bench/peers.sh). Builds veer in release mode,
# writes veer configs matching the peers' split (x-user-id, fallback client
# IP; canary share -p), and passes two veer targets: "veer" with the judge on
# (mode enforce, the default) and "veer-off" with [route.judge] mode = "off",
# so the cost of recording and judging is measured in the same run.
#
# PGO=1 adds a third, "veer-pgo": the profile-guided build (PGO=1
# deploy/build-veer.sh, trained by benches/pgo_train.rs on every protocol),
# judge on.
#
# LOG=1 adds three more: "veer-log", veer with `access_log = "all"`;
# "nginx-log", nginx with the peers' split and a JSON access log line a
# request carrying veer's fields (benches/nginx-log.py), unbuffered (its
# default); "nginx-logb", the same with `buffer=32k flush=50ms` (what
# veer's batching amounts to). Each writes its lines to a file in the
# configs' directory (deleted after the run): what an access log costs
# each, in the same rounds.
#
# AB=PATH adds "veer-ab": another veer binary (an earlier commit's build,
# or the same code built another way), judge on, in the same rounds, and
# pairs it against "veer" as well as nginx. Two builds measured in separate
# runs on this host differ by the host's moment as much as by their code
# (session 63: 0.795x to 1.007x of nginx across runs of one commit); in one
# run's rounds they share it. AB=target/release/veer against the -p build
# (or a copy of the same file) gives the floor: what two equal builds differ.
#
# After the peers' table, benches/paired.py compares each target with nginx
# round by round (the targets of a round share the host's moment): the
# median ratio with its confidence interval, the way to read a few percent
# on a host whose rounds spread by tens of percent. Give it rounds: 5 rounds
# make a 94 % interval of the whole range, 15 a 96 % one of the 4th to 12th.
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
(cd "$ROOT" && cargo build --release --locked -p veer-proxy --bin veer)
CFG_DIR=$(mktemp -d /tmp/veer-bench.XXXXXX)
config() { # name port admin_port judge_mode
cat > "$CFG_DIR/$1.toml" <<TOML
[proxy]
listen = ["127.0.0.1:$2"]
workers = $WORKERS
[admin]
listen = "127.0.0.1:$3"
[state]
dir = "$CFG_DIR/state-$1"

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
[route.judge]
mode = "$4"
TOML
}
config veer $((BASE_PORT + 13)) $((BASE_PORT + 14)) enforce
config veer-off $((BASE_PORT + 15)) $((BASE_PORT + 16)) off
echo "veer configs: $CFG_DIR"
extra=()
if [ "${PGO:-0}" = 1 ]; then
  host=$(rustc -vV | awk '/^host:/ {print $2}')
  PGO=1 "$ROOT/deploy/build-veer.sh" "$host" "$ROOT/target/pgo/veer"
  config veer-pgo $((BASE_PORT + 21)) $((BASE_PORT + 22)) enforce
  extra+=("veer-pgo=127.0.0.1:$((BASE_PORT + 21))=$ROOT/target/pgo/veer run --config $CFG_DIR/veer-pgo.toml")
fi
if [ "${LOG:-0}" = 1 ]; then
  config veer-log $((BASE_PORT + 23)) $((BASE_PORT + 24)) enforce
  sed -i 's/^workers = .*/&\naccess_log = "all"/' "$CFG_DIR/veer-log.toml"
  extra+=("veer-log=127.0.0.1:$((BASE_PORT + 23))=env RUST_LOG=info $ROOT/target/release/veer run --config $CFG_DIR/veer-log.toml 2> $CFG_DIR/veer-access.log")
  # nginx_log NAME PORT [BUFFER]: nginx with the peers' split and the log.
  nginx_log() {
    sed -e "s#@RUN@#$CFG_DIR#g" -e "s#@WORKERS@#$WORKERS#g" -e "s#@NGINX_PORT@#$2#g" \
      -e "s#@STABLE_PORT@#$((BASE_PORT + 1))#g" -e "s#@CANARY_PORT@#$((BASE_PORT + 2))#g" \
      -e "s#@CANARY_PCT@#$PCT#g" -e "s#nginx-proxy.pid#$1.pid#" \
      "$ROOT/../shared/bench/peers/nginx-proxy.conf" > "$CFG_DIR/$1.conf"
    python3 "$HERE/nginx-log.py" "$CFG_DIR/$1.conf" "$CFG_DIR/$1-access.log" bench ${3:+"$3"}
    extra+=("$1=127.0.0.1:$2=nginx -p $CFG_DIR -c $CFG_DIR/$1.conf")
  }
  nginx_log nginx-log $((BASE_PORT + 25))
  # The same with the buffer veer's batching amounts to.
  nginx_log nginx-logb $((BASE_PORT + 26)) "buffer=32k flush=50ms"
  trap 'rm -f "$CFG_DIR"/*access*.log' EXIT
fi
if [ -n "${AB:-}" ]; then
  [ -x "$AB" ] || { echo "AB=$AB: not an executable file" >&2; exit 2; }
  AB=$(cd "$(dirname "$AB")" && pwd)/$(basename "$AB")
  config veer-ab $((BASE_PORT + 27)) $((BASE_PORT + 28)) enforce
  extra+=("veer-ab=127.0.0.1:$((BASE_PORT + 27))=$AB run --config $CFG_DIR/veer-ab.toml")
fi
targets=(
  "veer=127.0.0.1:$((BASE_PORT + 13))=$ROOT/target/release/veer run --config $CFG_DIR/veer.toml"
  "veer-off=127.0.0.1:$((BASE_PORT + 15))=$ROOT/target/release/veer run --config $CFG_DIR/veer-off.toml"
  "${extra[@]}"
)
# Every target (ours and NAME=127.0.0.1:PORT=CMD ones given on the command
# line) on a port of its own, free before the run: a target that cannot
# bind would leave its column measuring whatever holds the port (session
# 32 lost a column that way).
ports=()
for a in "${args[@]}" "${targets[@]}"; do
  case $a in
    *=127.0.0.1:*=*) p=${a#*=127.0.0.1:}; ports+=("${p%%=*}") ;;
  esac
done
dup=$(printf '%s\n' "${ports[@]}" | sort | uniq -d | tr '\n' ' ')
[ -z "$dup" ] || { echo "two targets on one port: $dup" >&2; exit 2; }
for p in "${ports[@]}"; do
  if (exec 3<> "/dev/tcp/127.0.0.1/$p") 2> /dev/null; then
    echo "port $p is in use before the run" >&2
    exit 2
  fi
done
export RUN_DIR=${RUN_DIR:-$(mktemp -d /tmp/peers-bench.XXXXXX)}
RUST_LOG=warn bash "$PEERS" "${args[@]}" "${targets[@]}"
python3 "$HERE/paired.py" "$RUN_DIR" | tee -a "$RUN_DIR/table.md"
if [ -n "${AB:-}" ]; then
  echo "veer-ab: $AB" | tee -a "$RUN_DIR/table.md"
  python3 "$HERE/paired.py" "$RUN_DIR" veer | tee -a "$RUN_DIR/table.md"
fi
