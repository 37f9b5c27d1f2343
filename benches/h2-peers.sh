#!/usr/bin/env bash
# HTTP/2 and gRPC side by side: veer and nginx on loopback, measured with
# h2load (Debian nghttp2-client, installed if missing).
#
# Two paths, each through both proxies:
#   grpc-h2c   h2load over h2c (prior knowledge), POST application/grpc calls
#              -> proxy -> an h2c origin (nginx answering 200, grpc-status 0).
#              nginx proxies with grpc_pass; veer with an h2c:// endpoint.
#   h2tls-h1   h2load over TLS (h2 by ALPN), GET -> proxy -> an HTTP/1.1
#              origin (nginx, "ok\n"). nginx: proxy_pass with keepalive.
#   h1tls-h1   the same over HTTP/1.1 on TLS (h2load --h1, http/1.1 by ALPN,
#              one request at a time on each of the -c connections).
# veer runs with the judge on (config.example.toml's judge section).
#
# usage: benches/h2-peers.sh [-m pinned|unpinned] [-r REPS] [-d SECONDS] [-c CLIENTS] [-s STREAMS]
#   VEER=path: that veer binary instead of a fresh target/release/veer
#   (say, deploy/build-veer.sh's profile-guided one).
#   pinned (default): each proxy has 1 worker on CPU 1; h2load and the origin on CPU 0.
#   unpinned: proxies get 2 workers, nothing pinned.
# Defaults: -r 3 -d 8 -c 50 -s 10 (50 connections x 10 concurrent streams).
# Output: a table (median req/s over reps, proxy CPU us/request, peak RSS) on
# stdout and in $RUN/table.md; raw h2load output in $RUN.
# Only 127.0.0.1 is targeted; every load run is bounded by -d and timeout.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
MODE=pinned REPS=3 DUR=8 CLIENTS=50 STREAMS=10
while getopts "m:r:d:c:s:" o; do
  case $o in
    m) MODE=$OPTARG ;; r) REPS=$OPTARG ;; d) DUR=$OPTARG ;; c) CLIENTS=$OPTARG ;; s) STREAMS=$OPTARG ;;
    *) sed -n '2,24p' "$0"; exit 2 ;;
  esac
done
case $MODE in
  pinned) WORKERS=1; PIN_PROXY="taskset -c 1"; PIN_LOAD="taskset -c 0" ;;
  unpinned) WORKERS=2; PIN_PROXY=""; PIN_LOAD="" ;;
  *) echo "bad mode $MODE"; exit 2 ;;
esac

if ! command -v h2load >/dev/null; then
  echo "installing nghttp2-client (h2load)"
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q nghttp2-client >/dev/null
fi
command -v nginx >/dev/null || { echo "nginx is needed (apt-get install nginx-light)"; exit 1; }

BASE=${BASE_PORT:-18380}
H2C_ORIGIN=$((BASE + 1)) H1_ORIGIN=$((BASE + 2))
NGINX_H2C=$((BASE + 11)) NGINX_TLS=$((BASE + 12))
VEER_H2C=$((BASE + 13)) VEER_TLS=$((BASE + 14)) VEER_ADMIN=$((BASE + 15))
RUN=${RUN_DIR:-$(mktemp -d /tmp/h2-peers.XXXXXX)}
mkdir -p "$RUN"
echo "run dir: $RUN  mode: $MODE (proxy workers=$WORKERS)  h2load -c$CLIENTS -m$STREAMS -D$DUR x$REPS"

(cd "$ROOT" && cargo build --release --locked -p veer-proxy --bin veer)
VEER="${VEER:-$ROOT/target/release/veer}"

openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$RUN/tls.key" -out "$RUN/tls.crt" 2>/dev/null

cat > "$RUN/origin.conf" <<EOF
worker_processes 1;
daemon off;
pid $RUN/origin.pid;
error_log $RUN/origin.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$H2C_ORIGIN http2;
    location / { add_header grpc-status 0 always; default_type application/grpc; return 200 "ok\n"; }
  }
  server {
    listen 127.0.0.1:$H1_ORIGIN;
    location / { default_type text/plain; return 200 "ok\n"; }
  }
}
EOF
cat > "$RUN/nginx-proxy.conf" <<EOF
worker_processes $WORKERS;
daemon off;
pid $RUN/nginx-proxy.pid;
error_log $RUN/nginx-proxy.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream grpc_origin { server 127.0.0.1:$H2C_ORIGIN; keepalive 64; }
  upstream h1_origin { server 127.0.0.1:$H1_ORIGIN; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX_H2C http2;
    location / { grpc_pass grpc://grpc_origin; }
  }
  server {
    listen 127.0.0.1:$NGINX_TLS ssl http2;
    ssl_certificate $RUN/tls.crt;
    ssl_certificate_key $RUN/tls.key;
    location / {
      proxy_pass http://h1_origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
# The judge section is config.example.toml's.
JUDGE=$(awk '/^\[route.judge\]/ {f=1; print; next} /^\[/ {f=0} f && !/^[[:space:]]*#/ && NF' "$ROOT/config.example.toml")
cat > "$RUN/veer.toml" <<EOF
[proxy]
listen = ["127.0.0.1:$VEER_H2C"]
workers = $WORKERS
[proxy.tls]
listen = ["127.0.0.1:$VEER_TLS"]
cert = "$RUN/tls.crt"
key = "$RUN/tls.key"
[admin]
listen = "127.0.0.1:$VEER_ADMIN"
[state]
dir = "$RUN/veer-state"

[[route]]
name = "grpc"
path_prefix = "/grpc."
sticky = ["header:x-user-id", "client-ip"]
[route.stable]
version = "v1"
endpoints = ["h2c://127.0.0.1:$H2C_ORIGIN"]
$JUDGE

[[route]]
name = "web"
sticky = ["header:x-user-id", "client-ip"]
[route.stable]
version = "v1"
endpoints = ["127.0.0.1:$H1_ORIGIN"]
$JUDGE
EOF
"$VEER" check --config "$RUN/veer.toml" >/dev/null

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
$PIN_LOAD nginx -e "$RUN/origin.err" -p "$RUN" -c "$RUN/origin.conf" & PIDS+=($!)
$PIN_PROXY nginx -e "$RUN/nginx-proxy.err" -p "$RUN" -c "$RUN/nginx-proxy.conf" & PIDS+=($!); NGINX_PID=$!
RUST_LOG=warn $PIN_PROXY "$VEER" run --config "$RUN/veer.toml" 2>"$RUN/veer.log" & PIDS+=($!); VEER_PID=$!
for i in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$VEER_ADMIN/readyz" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$VEER_ADMIN/readyz" >/dev/null || { echo "veer did not start"; cat "$RUN/veer.log"; exit 1; }

printf '\0\0\0\0\0' > "$RUN/grpc-body"
cpu_ticks() { # utime+stime of a process and its children
  local t=0 p
  for p in $1 $(pgrep -P "$1" || true); do
    [ -r "/proc/$p/stat" ] && t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo $t
}
peak_rss() {
  local t=0 p
  for p in $1 $(pgrep -P "$1" || true); do
    [ -r "/proc/$p/status" ] && t=$((t + $(awk '/VmHWM/ {print $2}' "/proc/$p/status")))
  done
  echo $((t / 1024))
}
HZ=$(getconf CLK_TCK)
run() { # name path url pid rep
  local name=$1 path=$2 url=$3 pid=$4 rep=$5 out t0 t1 reqs rps args=()
  out="$RUN/h2load-$name-$path-$rep.txt"
  local streams=$STREAMS
  if [ "$path" = grpc-h2c ]; then
    args=(-d "$RUN/grpc-body" -H 'content-type: application/grpc' -H 'te: trailers')
  elif [ "$path" = h1tls-h1 ]; then
    args=(--h1) streams=1
  fi
  t0=$(cpu_ticks "$pid")
  timeout $((DUR + 30)) $PIN_LOAD h2load -c "$CLIENTS" -m "$streams" -t 1 -D "$DUR" "${args[@]}" "$url" > "$out" 2>&1 || true
  t1=$(cpu_ticks "$pid")
  rps=$(awk '/^finished in/ {gsub(",", "", $4); print $4}' "$out")
  reqs=$(awk '/^requests:/ {print $8}' "$out")  # succeeded
  local status2xx
  status2xx=$(awk '/^status codes:/ {print $3}' "$out")
  echo "$name $path $rep ${rps:-0} ${status2xx:-0} $(( (t1 - t0) )) ${reqs:-0}" >> "$RUN/raw.txt"
}
: > "$RUN/raw.txt"
for rep in $(seq 1 "$REPS"); do
  run nginx grpc-h2c "http://127.0.0.1:$NGINX_H2C/grpc.health.v1.Health/Check" "$NGINX_PID" "$rep"
  run veer grpc-h2c "http://127.0.0.1:$VEER_H2C/grpc.health.v1.Health/Check" "$VEER_PID" "$rep"
  run nginx h2tls-h1 "https://127.0.0.1:$NGINX_TLS/" "$NGINX_PID" "$rep"
  run veer h2tls-h1 "https://127.0.0.1:$VEER_TLS/" "$VEER_PID" "$rep"
  run nginx h1tls-h1 "https://127.0.0.1:$NGINX_TLS/" "$NGINX_PID" "$rep"
  run veer h1tls-h1 "https://127.0.0.1:$VEER_TLS/" "$VEER_PID" "$rep"
done
python3 - "$RUN/raw.txt" "$HZ" "$REPS" "$(peak_rss "$NGINX_PID")" "$(peak_rss "$VEER_PID")" <<'PY' | tee "$RUN/table.md"
import statistics, sys
raw, hz, reps, rss_nginx, rss_veer = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rows = [l.split() for l in open(raw) if l.strip()]
print(f"| path | proxy | req/s (median of {reps}) | 2xx share | proxy CPU us/request | peak RSS MiB |")
print("|---|---|---|---|---|---|")
for path in ["grpc-h2c", "h2tls-h1", "h1tls-h1"]:
    for name, rss in [("nginx", rss_nginx), ("veer", rss_veer)]:
        r = [x for x in rows if x[0] == name and x[1] == path]
        rps = statistics.median(float(x[3]) for x in r)
        ok = sum(int(x[4]) for x in r)
        ticks = sum(int(x[5]) for x in r)
        done = sum(int(x[6]) for x in r)
        us = ticks / hz * 1e6 / done if done else 0
        print(f"| {path} | {name} | {rps:.0f} | {ok / done if done else 0:.3f} | {us:.1f} | {rss} |")
PY

grep -h "errored\|failed" "$RUN"/h2load-*.txt | sort | uniq -c | head -5 || true
