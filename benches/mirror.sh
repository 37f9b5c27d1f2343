#!/usr/bin/env bash
# What mirroring costs the client: the release binary in front of a fast
# stable origin (nginx, "ok\n") and a canary that answers after 500 ms
# (a small Python server), weight 0, wrk with a fresh x-user-id per request.
# Three runs: no [route.mirror], percent = 10, percent = 100 (max_concurrent
# 100: the canary's 500 ms keeps ~100 copies in flight at 200 copies/s, so
# most chosen requests find the cap full). Prints wrk's req/s and latency
# percentiles per run, and what veer_mirror_requests_total counted.
# The judge runs in observe mode (the slow canary would otherwise be
# reverted after its warm-up, which stops the mirroring being measured).
#
# usage: [VEER=binary] benches/mirror.sh [SECONDS]   (default 10)
# Pinned: veer 1 worker on CPU 1; wrk and the origins on CPU 0.
# Only 127.0.0.1 is targeted; every run is bounded in time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DUR=${1:-10}
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
veer_binary
for t in wrk nginx python3 taskset curl; do
  command -v "$t" > /dev/null || { echo "needs $t" >&2; exit 1; }
done
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
wait_http() { for _ in $(seq 1 300); do curl -sf -o /dev/null "$1" && return 0; sleep 0.05; done; echo "never up: $1" >&2; exit 1; }

stable_port=$(free_port); canary_port=$(free_port)
cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen 127.0.0.1:$stable_port; keepalive_requests 1000000; location / { return 200 "ok\n"; } }
}
NGINX
timeout 600 taskset -c 0 nginx -e "$work/nginx.err" -p "$work" -c "$work/nginx.conf" & pids+=($!)
cat > "$work/slow.py" <<'PY'
import asyncio, sys
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            await asyncio.sleep(0.5)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nslow\n")
            await writer.drain()
    except Exception:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    async with server:
        await server.serve_forever()
asyncio.run(main())
PY
timeout 600 taskset -c 0 python3 "$work/slow.py" "$canary_port" & pids+=($!)
wait_http "http://127.0.0.1:$stable_port/"
wait_http "http://127.0.0.1:$canary_port/"

cat > "$work/keys.lua" <<'LUA'
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/", { ["x-user-id"] = "u" .. math.random(1, 1000000000) .. "-" .. n })
end
LUA

judge=$(awk '/^\[route.judge\]/{on=1; print; next} on && /^(\[|# \[)/{exit} on' config.example.toml | sed 's/^mode = "enforce"/mode = "observe"/')

run() { # LABEL MIRROR_SECTION
  local label=$1 mirror=$2
  local listen admin
  listen=$(free_port); admin=$(free_port)
  rm -rf "$work/state"
  cat > "$work/veer.toml" <<TOML
[proxy]
listen = ["127.0.0.1:$listen"]
workers = 1
[admin]
listen = "127.0.0.1:$admin"
[state]
dir = "$work/state"
[[route]]
name = "web"
sticky = ["header:x-user-id"]
[route.stable]
version = "v1"
endpoints = ["127.0.0.1:$stable_port"]
[route.canary]
version = "v2"
endpoints = ["127.0.0.1:$canary_port"]
weight = 0
$judge
$mirror
TOML
  timeout 300 taskset -c 1 "$VEER" run --config "$work/veer.toml" > "$work/veer.log" 2>&1 &
  local tpid=$!
  wait_http "http://127.0.0.1:$admin/readyz"
  local vpid
  vpid=$(pgrep -P "$tpid" | head -n 1)   # `timeout` is the parent, veer (whatever its file name) its one child
  taskset -c 0 wrk -t1 -c50 -d2s -s "$work/keys.lua" "http://127.0.0.1:$listen/" > /dev/null   # warm-up
  local out
  out=$(taskset -c 0 wrk -t1 -c50 -d"${DUR}s" --latency -s "$work/keys.lua" "http://127.0.0.1:$listen/")
  local rps p50 p90 p99 errs
  rps=$(awk '/Requests\/sec/ {print $2}' <<< "$out")
  p50=$(awk '$1 == "50%" {print $2}' <<< "$out")
  p90=$(awk '$1 == "90%" {print $2}' <<< "$out")
  p99=$(awk '$1 == "99%" {print $2}' <<< "$out")
  errs=$(awk '/Non-2xx/ {print $4}' <<< "$out")
  local counts
  counts=$(curl -s "http://127.0.0.1:$admin/metrics" | awk -F'[{}]' '/^veer_mirror_requests_total/ { split($2, l, ","); for (i in l) if (l[i] ~ /^result=/) { gsub(/result=|"/, "", l[i]); r = l[i] } ; n = $3 + 0; if (n > 0) printf "%s %d, ", r, n }')
  local rss
  rss=$(awk '/VmHWM/ {printf "%.0f MiB", $2 / 1024}' "/proc/$vpid/status" 2>/dev/null || echo "-")
  printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$rps" "$p50" "$p90" "$p99" "${errs:-0}" "$rss" "${counts%, }"
  kill "$vpid"; wait "$tpid" 2>/dev/null || true
}

printf '| mirroring | req/s | p50 | p90 | p99 | non-2xx | peak RSS | veer_mirror_requests_total |\n|---|---|---|---|---|---|---|---|\n'
# MIRROR="off 10 100 off" (default): the runs, in order.
for m in ${MIRROR:-off 10 100 off}; do
  if [ "$m" = off ]; then
    run "off" ""
  else
    run "$m %" "$(printf '[route.mirror]\npercent = %s' "$m")"
  fi
done
