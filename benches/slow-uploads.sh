#!/usr/bin/env bash
# Slow-drip uploads against an endpoint's connection cap: a threaded
# origin that reads each request's whole body before answering, one route
# to it with `max_upstream_connections = N`, `body_timeout = "5s"`; N
# connections from one address each send a `POST` announcing LEN bytes
# (default 1000) and then one byte of the body every 2 s; beside them,
# three GETs a second (3 s limit each) for RUN_SECONDS (default 16). Prints
# the GETs' status codes second by second and a summary. With LEN no
# longer than `[proxy] request_buffer` the bodies are read whole before
# an upstream connection is taken, and hold none; with LEN over it (or
# REQUEST_BUFFER=0) they stream, and hold the endpoint's upload slots
# (half its connections: the other drips get 503 `overloaded`); either
# way the GETs should be served.
#
# usage: [VEER=binary] [LEN=bytes] [REQUEST_BUFFER=bytes] [RUN_SECONDS=s] benches/slow-uploads.sh [N]
# Only 127.0.0.1 is targeted; every run is bounded in count and time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
veer_binary
n="${1:-16}"
len="${LEN:-1000}"

seconds="${RUN_SECONDS:-16}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
origin_port=$(free_port)
proxy_port=$(free_port)
admin_port=$(free_port)
buffer_line=""
[ -n "${REQUEST_BUFFER:-}" ] && buffer_line="request_buffer = ${REQUEST_BUFFER}"
cat > "$work/veer.toml" <<TOML
[proxy]
listen = ["127.0.0.1:$proxy_port"]
body_timeout = "5s"
$buffer_line
[admin]
listen = "127.0.0.1:$admin_port"
[state]
dir = "$work/state"

[[route]]
name = "web"
max_upstream_connections = $n
[route.stable]
version = "v1"
endpoints = ["127.0.0.1:$origin_port"]
TOML
cat > "$work/origin.py" <<'PY'
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        n = int(self.headers.get("content-length", "0"))
        self.rfile.read(n)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    do_GET = do_POST = answer
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
timeout 600 python3 "$work/origin.py" "$origin_port" > "$work/origin.log" 2>&1 &
pids+=($!)
timeout 600 "$VEER" run --config "$work/veer.toml" > "$work/veer.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$admin_port/readyz" > /dev/null 2>&1 \
    && curl -s -o /dev/null "http://127.0.0.1:$origin_port/" && break
  sleep 0.1
done
echo "veer $("$VEER" --version 2>/dev/null || echo "$VEER"), $n drips announcing $len bytes, request_buffer ${REQUEST_BUFFER:-default}"
timeout 300 python3 - "$proxy_port" "$n" "$len" "$seconds" <<'PY'
import socket, sys, threading, time, urllib.request, urllib.error
port, n, length, seconds = (int(a) for a in sys.argv[1:5])
drips = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: {length}\r\n\r\n".encode())
    drips.append(s)
stop = threading.Event()
def drip():
    while not stop.is_set():
        for s in drips:
            try:
                s.send(b"x")
            except OSError:
                pass
        stop.wait(2)
threading.Thread(target=drip, daemon=True).start()
def get():
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0
codes = []
t0 = time.time()
while time.time() - t0 < seconds:
    time.sleep(1)
    these = [get() for _ in range(3)]
    codes += these
    print(f"{time.time() - t0:5.1f}s GETs: {' '.join(map(str, these))}", flush=True)
stop.set()
ok = codes.count(200)
print(f"GETs served: {ok} of {len(codes)}; 503: {codes.count(503)}")
PY
curl -s "http://127.0.0.1:$admin_port/metrics" \
  | grep -E '^veer_(proxy_errors_total|request_buffer_full_total)' | grep -v ' 0$' || true
