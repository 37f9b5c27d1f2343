#!/usr/bin/env bash
# What an answer costs veer by upstream protocol and allocator purge delay:
# GETs of BYTES-byte answers from one nginx origin over HTTP/1.1
# (`http://`, veer's own client) and over HTTP/2 (`h2c://`, hyper's and
# the h2 crate's), each with MIMALLOC_PURGE_DELAY=0 (what veer sets for
# itself) and 100. Pinned: veer (1 worker) on CPU 1; wrk (50 connections)
# and the origin on CPU 0. Prints, per case and round (cases interleaved),
# answers a second, veer's CPU and minor page faults an answer (from
# /proc/PID/stat over the measured window) and its peak RSS.
#
# usage: [VEER=binary] [DELAYS='0 100'] [SCHEMES='http h2c'] benches/upstream-faults.sh
#          [-b BYTES] [-d SECONDS] [-r ROUNDS]
#   (defaults: 65536 bytes, 5 s, 2 rounds; DELAYS and SCHEMES: the purge
#   delays in ms and the upstream protocols measured). Needs nginx and wrk
#   (benches/peers.sh installs them). Only 127.0.0.1 is targeted; every
#   load run is bounded by -d.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
BYTES=65536 DUR=5 ROUNDS=2
while getopts "b:d:r:" o; do
  case $o in
    b) BYTES=$OPTARG ;; d) DUR=$OPTARG ;; r) ROUNDS=$OPTARG ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
  esac
done
for tool in nginx wrk taskset; do
  command -v "$tool" > /dev/null || { echo "$tool is needed (benches/peers.sh installs nginx and wrk)" >&2; exit 1; }
done
veer_binary
work="$(mktemp -d)"
origin="" veer=""
cleanup() {
  for p in $veer $origin; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/www"
head -c "$BYTES" /dev/zero | tr '\0' 'a' > "$work/www/body"
h1=$(free_port) h2=$(free_port)
cat > "$work/origin.conf" <<EOF
worker_processes 1;
daemon off;
master_process off;
pid $work/origin.pid;
error_log $work/origin.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_timeout 65s;
    keepalive_requests 10000000;
    server { listen 127.0.0.1:$h1; location / { root $work/www; try_files /body =404; } }
    server { listen 127.0.0.1:$h2 http2; location / { root $work/www; try_files /body =404; } }
}
EOF
taskset -c 0 nginx -p "$work" -c "$work/origin.conf" &
origin=$!
tck=$(getconf CLK_TCK)
# stat fields after the command's name: minflt is the 8th, utime+stime the 12th and 13th.
stat_of() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $8, $12 + $13}'; }

measure() { # SCHEME PORT DELAY ROUND
  local port admin
  port=$(free_port) admin=$(free_port)
  rm -rf "$work/state"
  printf '[proxy]\nlisten = ["127.0.0.1:%s"]\nworkers = 1\n[admin]\nlisten = "127.0.0.1:%s"\n[state]\ndir = "%s/state"\n[[route]]\nname = "bench"\n[route.stable]\nversion = "v1"\nendpoints = ["%s127.0.0.1:%s"]\n[route.judge]\nmode = "enforce"\n' \
    "$port" "$admin" "$work" "$1" "$2" > "$work/veer.toml"
  MIMALLOC_PURGE_DELAY=$3 taskset -c 1 "$VEER" run --config "$work/veer.toml" > "$work/veer.log" 2>&1 &
  veer=$!
  for _ in $(seq 1 500); do
    curl -sf -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.02
  done
  taskset -c 0 timeout 30 wrk -t1 -c50 -d2s "http://127.0.0.1:$port/" > /dev/null
  local f0 c0 f1 c1
  read -r f0 c0 < <(stat_of "$veer")
  taskset -c 0 timeout $((DUR + 30)) wrk -t1 -c50 -d"${DUR}s" "http://127.0.0.1:$port/" > "$work/wrk.txt"
  read -r f1 c1 < <(stat_of "$veer")
  local hwm n
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$veer/status")
  kill "$veer"; wait "$veer" 2> /dev/null || true; veer=""
  n=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
  awk -v s="${1:-http://}" -v d="$3" -v r="$4" -v n="$n" -v t="$DUR" -v f=$((f1 - f0)) -v c=$((c1 - c0)) -v hz="$tck" -v m="$hwm" \
    -v e="$(grep -c 'Non-2xx\|Socket errors' "$work/wrk.txt" || true)" 'BEGIN {
      printf "| %s | %s | %d | %.0f | %.1f | %.2f | %d MiB | %s |\n", s, d, r, n / t, c / hz * 1e6 / n, f / n, m / 1024, (e > 0 ? "errors" : "0")
    }'
}

echo "answers of $BYTES bytes, 50 connections, ${DUR}s a case, veer pinned (CPU 1), wrk and origin on CPU 0"
echo "| upstream | MIMALLOC_PURGE_DELAY | round | answers/s | CPU us an answer | page faults an answer | peak RSS | wrk errors |"
echo "|---|---|---|---|---|---|---|---|"
for r in $(seq 1 "$ROUNDS"); do
  for s in ${SCHEMES:-http h2c}; do
    case $s in
      http) scheme="" port=$h1 ;;
      h2c) scheme="h2c://" port=$h2 ;;
      *) echo "SCHEMES: http or h2c, not $s" >&2; exit 2 ;;
    esac
    for delay in ${DELAYS:-0 100}; do
      measure "$scheme" "$port" "$delay" "$r"
    done
  done
done
