#!/usr/bin/env bash
# What a Prometheus scrape costs the requests being served: veer with N
# routes (default 1 000) that have all carried traffic, so `/metrics`
# holds every route's series, and `workers = 1` (the sidecar setting);
# keyed keep-alive load on one route (`wrk -t1 -c20`, 8 s) without
# scrapes, then with `/metrics` fetched every SCRAPE seconds (default
# 0.5, far more often than Prometheus's 15 s, so that an 8 s run sees
# enough scrapes to show in its p99), ROUNDS times (default 2).
#
# usage: [VEER=binary] [ROUNDS=R] [SCRAPE=s] [WORKERS=W] benches/scrape-stall.sh [N]
# Upstreams: `veer demo --upstreams-only` (127.0.0.1:18001 and :18002).
# Only 127.0.0.1 is targeted; every run is bounded in count and time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
veer_binary
command -v wrk > /dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }
n="${1:-1000}"
rounds="${ROUNDS:-2}"
every="${SCRAPE:-0.5}"
workers="${WORKERS:-1}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
proxy_port=$(free_port)
admin_port=$(free_port)
{
  printf '[proxy]\nlisten = ["127.0.0.1:%s"]\nworkers = %s\n[admin]\nlisten = "127.0.0.1:%s"\n[state]\ndir = "%s/state"\n' \
    "$proxy_port" "$workers" "$admin_port" "$work"
  for ((i = 0; i < n; i++)); do
    printf '[[route]]\nname = "r%d"\nhosts = ["r%d.example"]\nsticky = ["header:x-user-id"]\n[route.stable]\nversion = "v1"\nendpoints = ["127.0.0.1:18001"]\n[route.canary]\nversion = "v2"\nendpoints = ["127.0.0.1:18002"]\nweight = 50\n' "$i" "$i"
  done
} > "$work/veer.toml"
timeout 600 "$VEER" demo --upstreams-only > "$work/demo.log" 2>&1 &
pids+=($!)
timeout 600 "$VEER" run --config "$work/veer.toml" > "$work/veer.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$admin_port/readyz" > /dev/null 2>&1 \
    && curl -s -o /dev/null "http://127.0.0.1:18001/" && curl -s -o /dev/null "http://127.0.0.1:18002/" && break
  sleep 0.1
done
# Every route and both versions take requests: each has its series.
python3 - "$proxy_port" "$n" <<'EOF'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    for u in range(4):
        s.sendall(f"GET / HTTP/1.1\r\nHost: r{i}.example\r\nx-user-id: u{u}\r\n\r\n".encode())
    got = b""
    while got.count(b"HTTP/1.1 ") < 4:
        d = s.recv(65536)
        if not d:
            break
        got += d
    s.close()
EOF
size=$(curl -s -o /dev/null -w '%{size_download} bytes in %{time_total} s' "http://127.0.0.1:$admin_port/metrics")
printf 'wrk.headers["Host"] = "r5.example"\nwrk.headers["x-user-id"] = "u1"\n' > "$work/host.lua"
echo "$n routes, workers = $workers; /metrics: $size"
echo
echo '| round | scrapes | req/s | p50 | p99 | max |'
echo '|---|---|---|---|---|---|'
load() { # ROUND LABEL
  wrk -t1 -c20 -d8s --latency -s "$work/host.lua" "http://127.0.0.1:$proxy_port/" > "$work/wrk.out"
  awk -v r="$1" -v l="$2" '
    /^    Latency/ { max = $4 }
    /^     50%/ { p50 = $2 }
    /^     99%/ { p99 = $2 }
    /^Requests\/sec/ { rate = $2 }
    END { printf "| %s | %s | %.0f | %s | %s | %s |\n", r, l, rate, p50, p99, max }' "$work/wrk.out"
}
for ((r = 1; r <= rounds; r++)); do
  load "$r" none
  scrapes=$(awk -v e="$every" 'BEGIN { printf "%d", 8 / e }')
  (for ((k = 0; k < scrapes; k++)); do
    curl -s -o /dev/null --max-time 5 "http://127.0.0.1:$admin_port/metrics"
    sleep "$every"
  done) &
  scraper=$!
  load "$r" "every $every s"
  wait "$scraper" 2> /dev/null || true
done
