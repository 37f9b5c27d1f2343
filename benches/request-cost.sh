#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind (the
# same for the same binary and inputs whatever else the machine is doing):
# the release binary (or each binary given) serves N and then 2N keep-alive
# GETs from 4 connections through one route with a canary at 10 % and the
# judge on, to the demo's upstreams; the difference divided by N is the
# cost of one request (start-up and shutdown cancel out). The last column
# leaves out the controller's task and its saves, whose cost is per second,
# not per request (see run below): compare binaries on that column.
#
# usage: benches/request-cost.sh [N] [BINARY...]   (default 5000, target/release/veer)
# A BINARY named `nginx` runs the system's nginx instead, configured by the
# shared peer script's split config (../shared/bench/peers/nginx-proxy.conf:
# the same key, split and keep-alive pools, 1 worker, no master process):
# the same count for the proxy veer is compared with.
# STABLE=host:port CANARY=host:port: other upstreams than the demo's (say, an
# nginx serving a large body), started by the caller.
# PROXY_EXTRA='key = value' adds lines to veer's [proxy] section (say,
# 'request_id = true': what a setting costs a request).
# ROUTE_KEYS='key = value' adds lines to the route's own keys (say,
# 'rewrite_prefix = "/v2/"').
# ROUTE_EXTRA='...' adds lines after the route's last table (say, a
# '[route.rate_limit]' table).
# BODY=N sends POSTs with an N-byte body instead of GETs: the path through
# hyper's client that a request with a body takes (GETs take veer's own
# HTTP/1.1 client, see proxy/src/raw.rs). The demo's upstreams do not read
# request bodies; give upstreams that do (say, STABLE and CANARY nginx
# origins, which discard them and keep the connection).
# SYSCALLS=1 counts system calls instead (strace -f -c, the same runs and
# difference): the kernel's share of a request, which callgrind does not
# see. Under strace every call is slower, so how many epoll_wait calls a
# request takes (how many requests one wake-up finds) differs from real
# load; the calls a request must make do not.
# CACHESIM=1 runs callgrind's cache simulation (valgrind --cache-sim=yes, a
# model of this machine's caches): per request, beside the instructions,
# the first-level instruction and data cache misses and the last-level
# misses, the controller left out as for the instructions. Two proxies
# with the same instruction count can differ in time by these: a
# first-level miss costs about ten cycles, a last-level one (to memory)
# hundreds.
# MIMALLOC_PURGE_DELAY is 0 unless the caller sets it: what `veer run` gives
# itself when its environment names none (by executing itself again, which
# under valgrind would run the new image outside callgrind's view).
# NGINX_ACCESS_LOG=1 gives nginx an access log: a JSON line a request with
# veer's access log fields, written to a file (veer's stderr goes to a file
# too).
# Only 127.0.0.1 is targeted; every run is bounded in count and time.
set -euo pipefail
export MIMALLOC_PURGE_DELAY="${MIMALLOC_PURGE_DELAY:-0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
n="${1:-5000}"
shift || true
bins=("$@")
if [ ${#bins[@]} -eq 0 ]; then
  (cd "$ROOT" && cargo build --release --locked -q -p veer-proxy --bin veer)
  bins=("$ROOT/target/release/veer")
fi
if [ -n "${SYSCALLS:-}" ]; then
  command -v strace >/dev/null || { echo "strace is needed (apt-get install strace)" >&2; exit 1; }
else
  command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
fi
# A guard on the request path's shape: LLVM inlines the future of
# `service::forward` into the request's own (`handle`'s). A few more lines
# in `forward` have made it stop (session 51: ~300 instructions and ~45
# first-level data misses more a GET, which no test sees); a binary whose
# symbols show that future as a function of its own is named here.
if command -v nm >/dev/null; then
  for bin in "${bins[@]}"; do
    [ "$bin" = nginx ] && continue
    if nm -C "$bin" 2>/dev/null | grep -q 'service::forward::{{closure}}$'; then
      echo "warning: $bin: service::forward's future is not inlined into the request's (see benches/RESULTS.md, session 51)" >&2
    fi
  done
fi
work="$(mktemp -d)"
ups=""
cleanup() { [ -n "$ups" ] && kill "$ups" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# KEEP=dir keeps each run's callgrind output there (for callgrind_annotate).
STABLE="${STABLE:-127.0.0.1:18001}"
CANARY="${CANARY:-127.0.0.1:18002}"
if [ "$STABLE" = 127.0.0.1:18001 ]; then
  demo="$ROOT/target/release/veer"
  for bin in "${bins[@]}"; do [ "$bin" != nginx ] && { demo=$bin; break; }; done
  [ -x "$demo" ] || (cd "$ROOT" && cargo build --release --locked -q -p veer-proxy --bin veer)
  "$demo" demo --upstreams-only > /dev/null 2>&1 &
  ups=$!
fi
for _ in $(seq 1 100); do
  curl -sf "http://$STABLE/" > /dev/null 2>&1 && break
  sleep 0.1
done

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# $2 keep-alive GETs (POSTs of $BODY bytes) to 127.0.0.1:$1 from 4
# connections, sticky keys of 1000 users.
drive() {
  python3 - "$1" "$2" "${BODY:-}" <<'PY'
import http.client, sys, threading
port, count = int(sys.argv[1]), int(sys.argv[2])
body = b"x" * int(sys.argv[3]) if sys.argv[3] else None
conns = 4
def worker(w):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(w, count, conns):
        c.request("POST" if body is not None else "GET", "/", body=body,
                  headers={"x-user-id": f"user-{i % 1000}"})
        r = c.getresponse(); r.read()
        if r.status != 200:
            sys.exit(f"HTTP {r.status}")
    c.close()
ts = [threading.Thread(target=worker, args=(w,)) for w in range(conns)]
[t.start() for t in ts]; [t.join() for t in ts]
PY
}

# Runs "$@" under callgrind (or strace) until $1 answers, sends it $3
# requests on port $2, stops it with signal $4 (both write their counts at
# exit) and keeps the counts as $KEEP/$5-$3.out if KEEP is set.
callgrind_run() {
  local ready=$1 port=$2 count=$3 signal=$4 name=$5
  shift 5
  # The proxy's output (its access log, when on) goes to a directory of its
  # own: veer watches its config's directory, and a log file beside the
  # config would wake that watch with every line.
  mkdir -p "$work/out"
  if [ -n "${SYSCALLS:-}" ]; then
    timeout 600 strace -f -c -o "$work/st-$count.out" "$@" > "$work/out/log" 2>&1 &
  else
    timeout 900 valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
      ${CACHESIM:+--cache-sim=yes} "$@" > "$work/out/log" 2>&1 &
  fi
  local vg=$!
  for _ in $(seq 1 600); do
    curl -sf "$ready" > /dev/null 2>&1 && break
    sleep 0.1
  done
  drive "$port" "$count"
  if [ -n "${SYSCALLS:-}" ]; then
    # timeout -> strace -> the proxy: strace passes on no signal of its own.
    pkill -"$signal" -P "$(pgrep -P "$vg" -x strace)" || true
  else
    kill -"$signal" "$vg"
  fi
  wait "$vg" || true
  [ -n "${SYSCALLS:-}" ] && return
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"
    cp "$work/cg.out" "$KEEP/$name-$count.out"
  fi
}

# Total instructions of one run serving $2 requests with binary $1 (or the
# system's nginx), and those of veer's controller.
run() {
  local bin=$1 count=$2 port admin
  port=$(free_port); admin=$(free_port)
  if [ "$bin" = nginx ]; then
    local conf="$ROOT/../shared/bench/peers/nginx-proxy.conf"
    command -v nginx >/dev/null || { echo "nginx is needed (apt-get install nginx)" >&2; exit 1; }
    [ -f "$conf" ] || { echo "peer config not found: $conf" >&2; exit 1; }
    sed -e "s#@RUN@#$work#g" -e "s#@WORKERS@#1#g" -e "s#@NGINX_PORT@#$port#g" \
      -e "s#@STABLE_PORT@#${STABLE##*:}#g" -e "s#@CANARY_PORT@#${CANARY##*:}#g" \
      -e "s#@CANARY_PCT@#10#g" -e "s#master_process on#master_process off#" \
      "$conf" > "$work/nginx.conf"
    if [ -n "${NGINX_ACCESS_LOG:-}" ]; then
      # A JSON line a request to a file, the fields veer's access log has
      # (what `PROXY_EXTRA='access_log = "all"'` is compared with).
      python3 "$ROOT/benches/nginx-log.py" "$work/nginx.conf" "$work/access.log" r
    fi
    # Its readiness probe is one request more, in both runs alike.
    callgrind_run "http://127.0.0.1:$port/" "$port" "$count" QUIT nginx \
      nginx -p "$work" -c "$work/nginx.conf"
  else
    rm -rf "$work/state"
    cat > "$work/veer.toml" <<TOML
[proxy]
listen = ["127.0.0.1:$port"]
workers = 1
${PROXY_EXTRA:-}
[admin]
listen = "127.0.0.1:$admin"
[state]
dir = "$work/state"
[[route]]
name = "web"
sticky = ["header:x-user-id"]
${ROUTE_KEYS:-}
[route.stable]
version = "v1"
endpoints = ["$STABLE"]
[route.canary]
version = "v2"
endpoints = ["$CANARY"]
weight = 10
${ROUTE_EXTRA:-}
TOML
    callgrind_run "http://127.0.0.1:$admin/readyz" "$port" "$count" TERM \
      "$(basename "$bin")-$(echo "$bin" | md5sum | cut -c1-6)" \
      "$bin" run --config "$work/veer.toml"
  fi
  [ -n "${SYSCALLS:-}" ] && return
  local ev col total ctl
  # One pair (total, controller) an event: Ir alone, or the cache events too.
  local events=Ir
  [ -n "${CACHESIM:-}" ] && events="Ir I1mr D1mr D1mw ILmr DLmr DLmw"
  for ev in $events; do
    col=$(awk -v e="$ev" '/^events:/ { for (i = 2; i <= NF; i++) if ($i == e) print i }' "$work/cg.out")
    total=$(grep -E '^(summary|totals):' "$work/cg.out" | head -1 | awk -v c="$col" '{print $c}')
    # The controller's task (ticks every 100 ms, looks, saves) costs per
    # second, not per request; under valgrind a request takes ~100x longer, so
    # its ticks would weigh ~100x more per request than at real load, and
    # their count varies run to run. Its inclusive cost is taken out (none
    # for nginx).
    # So is its evidence save, every few seconds on tokio's blocking pool
    # (`State::save`: ~1.5-2.3M instructions each, 2 to 5 of them in a run,
    # ±150 a request of noise if left in).
    # (callgrind_annotate splits a function by the source files of its
    # inlined code; the largest inclusive entry is the function's. No
    # threshold: every function is listed.)
    ctl=$(callgrind_annotate --show="$ev" --threshold=100 --inclusive=yes "$work/cg.out" 2>/dev/null \
      | awk '$0 ~ /:veer_proxy::controller::Controller::run::\{\{closure\}\}( \[.*)?$/ {
          gsub(",", "", $1); if ($1 + 0 > m) m = $1 + 0 }
        $0 ~ /:veer_control::state::State::save( \[.*)?$/ {
          gsub(",", "", $1); if ($1 + 0 > s) s = $1 + 0 }
        END { print m + s }')
    printf '%s %s ' "$total" "${ctl:-0}"
  done
  echo
}

if [ -n "${SYSCALLS:-}" ]; then
  # System calls a request: the difference of the two runs' counts over N,
  # per call (strace -c's "calls" column; errors included).
  printf '| binary | system calls a request | of which |\n|---|---|---|\n'
  for bin in "${bins[@]}"; do
    run "$bin" "$n"
    run "$bin" "$((2 * n))"
    python3 - "$work/st-$n.out" "$work/st-$((2 * n)).out" "$n" "$bin" <<'PY'
import sys
def calls(path):
    out = {}
    for line in open(path):
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            out[f[-1]] = int(f[3])
    return out
a, b, n = calls(sys.argv[1]), calls(sys.argv[2]), int(sys.argv[3])
per = sorted(((b.get(k, 0) - a.get(k, 0)) / n, k) for k in set(a) | set(b))
parts = ", ".join(f"{k} {v:.2f}" for v, k in reversed(per) if v >= 0.01)
print(f"| {sys.argv[4]} | {sum(v for v, _ in per):.2f} | {parts} |")
PY
  done
  exit 0
fi
if [ -n "${CACHESIM:-}" ]; then
  # Per request (the two runs' difference over N), controller left out.
  printf '| binary | instructions | I1 misses | D1 misses (read, write) | LL misses (instr., data read, data write) |\n|---|---|---|---|---|\n'
  for bin in "${bins[@]}"; do
    read -r -a a < <(run "$bin" "$n")
    read -r -a b < <(run "$bin" "$((2 * n))")
    per=()
    for i in 0 2 4 6 8 10 12; do
      per+=("$(awk -v a="${a[i]}" -v ca="${a[i + 1]}" -v b="${b[i]}" -v cb="${b[i + 1]}" -v n="$n" \
        'BEGIN { printf "%.1f", (b - cb - a + ca) / n }')")
    done
    printf '| %s | %.0f | %s | %s (%s, %s) | %s, %s, %s |\n' "$bin" "${per[0]}" "${per[1]}" \
      "$(awk -v r="${per[2]}" -v w="${per[3]}" 'BEGIN { printf "%.1f", r + w }')" "${per[2]}" "${per[3]}" \
      "${per[4]}" "${per[5]}" "${per[6]}"
  done
  exit 0
fi
printf '| binary | Ir for %s requests | Ir for %s | instructions per request | of which the controller and its saves | per request without them |\n|---|---|---|---|---|---|\n' "$n" "$((2 * n))"
for bin in "${bins[@]}"; do
  read -r a ca < <(run "$bin" "$n")
  read -r b cb < <(run "$bin" "$((2 * n))")
  printf '| %s | %s | %s | %s | %s | %s |\n' "$bin" "$a" "$b" "$(( (b - a) / n ))" \
    "$(( (cb - ca) / n ))" "$(( (b - cb - a + ca) / n ))"
done
