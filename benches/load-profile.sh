#!/usr/bin/env bash
# Where a proxy's CPU goes at full load: the proxy pinned to CPU 1 (1
# worker), the shared peers' nginx origin and wrk pinned to CPU 0, as
# benches/peers.sh runs them; `perf record` samples the proxy (software
# cpu-clock, no hardware counter needed) for D seconds of wrk load. Prints
# the request rate, the kernel's and user space's shares of the samples,
# the top symbols by self time, and the share of the samples in functions
# matching PATTERN (default: veer's controller and recording).
#
# usage: benches/load-profile.sh [veer|nginx|haproxy] [D]   (default veer, 8)
# env: VEER=binary (default target/release/veer, built if missing),
#      UPLOAD=N (POSTs of an N-byte body instead of GETs, as
#      benches/upload-peers.sh sends them),
#      MODE=enforce|off (veer's judge), KEEP=dir (keep perf.data there),
#      GRAPH=1 (record call graphs: `perf report -G` on the kept data
#      names the callers, say of the kernel's wake-ups),
#      PATTERN=regex (symbols to sum), TOP=n (symbols listed, default 25),
#      BASE_PORT (default 19180)
# Needs perf (Debian linux-perf), nginx, wrk (and haproxy for it). Only
# 127.0.0.1 is targeted; the load is bounded by wrk's duration and timeout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
proxy="${1:-veer}"
dur="${2:-8}"
case $proxy in veer | nginx | haproxy) ;; *) echo "usage: $0 [veer|nginx|haproxy] [seconds]" >&2; exit 2 ;; esac
tools="perf nginx wrk"
[ "$proxy" = haproxy ] && tools="$tools haproxy"
for tool in $tools; do
  command -v "$tool" > /dev/null || { echo "$tool is needed" >&2; exit 1; }
done
peers="$ROOT/../shared/bench/peers"
[ -d "$peers" ] || { echo "peer configs not found: $peers" >&2; exit 1; }
VEER="${VEER:-$ROOT/target/release/veer}"
if [ "$proxy" = veer ] && [ ! -x "$VEER" ]; then
  (cd "$ROOT" && cargo build --release --locked -q -p veer-proxy --bin veer)
fi
# shellcheck source=benches/pinned-lib.sh
. "$ROOT/benches/pinned-lib.sh"
keep_perf() {
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$work/perf.data" "$KEEP/$proxy.perf.data" 2> /dev/null || true; fi
}
on_exit=keep_perf
pinned_run "${BASE_PORT:-19180}"
start_origin taskset -c 0
if [ -n "${UPLOAD:-}" ]; then make_posts "$work/wrk-userid.lua" "$UPLOAD"; fi
if [ "$proxy" = nginx ]; then
  fill nginx-proxy.conf > "$work/proxy.conf"
  taskset -c 1 nginx -p "$work" -c "$work/proxy.conf" -e "$work/proxy.err" &
elif [ "$proxy" = haproxy ]; then
  # The peers' weights: the canary at 20 % of 100.
  fill haproxy.cfg | sed -e "s#@HAPROXY_PORT@#$port#g" -e "s#@STABLE_W@#80#g" -e "s#@CANARY_W@#20#g" \
    > "$work/proxy.cfg"
  taskset -c 1 haproxy -db -f "$work/proxy.cfg" > "$work/proxy.err" 2>&1 &
else
  veer_config "${MODE:-enforce}"
  RUST_LOG=warn taskset -c 1 "$VEER" run --config "$work/veer.toml" > "$work/veer.log" 2>&1 &
fi
target=$!
pids+=("$target")
wait_ports "$stable" "$port"
url="http://127.0.0.1:$port/"
# A short warm-up fills both proxies' upstream pools before sampling.
timeout 30 taskset -c 0 wrk -t1 -c50 -d2s -s "$work/wrk-userid.lua" "$url" > /dev/null
timeout $((dur + 30)) perf record ${GRAPH:+-g} -F 4999 -o "$work/perf.data" -p "$target" -- sleep "$dur" 2> /dev/null &
rec=$!
timeout $((dur + 30)) taskset -c 0 wrk -t1 -c50 -d"${dur}s" -s "$work/wrk-userid.lua" "$url" \
  | awk '/^Requests\/sec/ {print "req/s: " $2}'
wait "$rec" || true
perf report -i "$work/perf.data" --no-children --sort symbol --stdio 2> /dev/null \
  | grep '%' > "$work/flat.txt"
pattern="${PATTERN:-controller|judg|record::|window::|hdrhistogram|State::save}"
awk -v pat="$pattern" '
  /\[k\]/ { k += $1 } /\[\.\]/ { u += $1 }
  $0 ~ pat { m += $1 }
  END { printf "kernel %.1f %%, user %.1f %% of samples; matching /%s/: %.2f %%\n", k, u, pat, m }' \
  "$work/flat.txt"
echo "top symbols by self time:"
head -"${TOP:-25}" "$work/flat.txt" | awk '{$NF = ""; $(NF - 1) = ""; print "  " $0}' | cut -c1-150
