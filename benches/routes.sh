#!/usr/bin/env bash
# What idle routes cost: the release binary with N routes (each with a
# canary, the judge on, no traffic at all), 2 workers. Prints, per N, the
# resident memory after start, the CPU the process used over 10 idle
# seconds (IDLE=seconds to measure longer: a clock tick is 1 % of a CPU
# over 1 s, so 10 s resolve 0.1 %), and how long a reload that changes one
# route takes to apply.
#
# ETCD=http://127.0.0.1:PORT puts the routes in a fleet (pooled evidence,
# the default) on that etcd, started by the caller on loopback; the table
# then also says how long joining took (from ready until every canary had
# its seat and its share of traffic) and the CPU it used, and the idle CPU
# is measured from 10 s after that.
#
# RELOADS=K then reloads the config K more times, a second apart (each
# changing one route's canary weight), and says the RSS a second after
# them and 6 s later (after the next periodic file check): what reloads
# leave resident (a reload parses the whole file afresh).
#
# REBUILDS=K pauses and resumes one route K times through the admin API
# (each action rebuilds the routing snapshot, as a revert does) and says
# the CPU a rebuild took, its admin call included.
#
# ENDPOINTS=own gives every route endpoints of its own (127.0.0.1:10000
# and up, where nothing listens; an idle route never connects), as an
# ingress's routes have; by default all routes share two.
#
# CHECKS=INTERVAL gives every route a [route.health_check] of that
# interval (GET /healthz): with ENDPOINTS=own, one checker per endpoint,
# each refused (nothing listens there), so the idle CPU is what the
# checkers' timers, connects and bookkeeping cost without any traffic;
# with shared endpoints, two checkers in all.
#
# usage: [VEER=binary] [IDLE=s] [ETCD=url] [RELOADS=K] [REBUILDS=K] [ENDPOINTS=own] [CHECKS=5s] benches/routes.sh [N ...]   (default: 1 100 500 1000)
# Only 127.0.0.1 is targeted; every run is bounded in time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# VEER=path/to/veer measures another build (e.g. an older commit's).
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
veer_binary
counts=("$@")
[ ${#counts[@]} -eq 0 ] && counts=(1 100 500 1000)
work="$(mktemp -d)"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
tck=$(getconf CLK_TCK)

config() { # N WEIGHT_OF_ROUTE_0
  local n=$1 w0=$2
  printf '[proxy]\nlisten = ["127.0.0.1:0"]\nworkers = 2\n[admin]\nlisten = "127.0.0.1:%s"\n[state]\ndir = "%s/state"\n' "$admin_port" "$work"
  if [ -n "${ETCD:-}" ]; then
    printf '[fleet]\nstore = "etcd"\nendpoints = ["%s"]\nname = "routes-bench-%s"\nreplica = "r1"\n' "$ETCD" "$$"
  fi
  for ((i = 0; i < n; i++)); do
    local w=5 s=1 c=2
    [ "$i" -eq 0 ] && w=$w0
    if [ "${ENDPOINTS:-}" = own ]; then s=$((10000 + 2 * i)) c=$((10001 + 2 * i)); fi
    printf '[[route]]\nname = "r%d"\nhosts = ["r%d.example"]\n[route.stable]\nversion = "v1"\nendpoints = ["127.0.0.1:%d"]\n[route.canary]\nversion = "v2"\nendpoints = ["127.0.0.1:%d"]\nweight = %s\n[route.judge]\nwindow = "60s"\n' "$i" "$i" "$s" "$c" "$w"
    if [ -n "${CHECKS:-}" ]; then
      printf '[route.health_check]\npath = "/healthz"\ninterval = "%s"\ntimeout = "500ms"\n' "$CHECKS"
    fi
  done
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
generation() { curl -s "http://127.0.0.1:$admin_port/status" | grep -o '"generation": *[0-9]*' | grep -o '[0-9]*$'; }

idle=${IDLE:-10}
head='| routes |' rule='|---|'
[ -n "${ETCD:-}" ] && head="$head joining the fleet |" rule="$rule---|"
head="$head RSS after start | CPU while idle ($idle s) | reload of one route |" rule="$rule---|---|---|"
[ -n "${RELOADS:-}" ] && head="$head RSS after $((RELOADS + 1)) reloads (6 s later) |" rule="$rule---|"
[ -n "${REBUILDS:-}" ] && head="$head CPU a rebuild |" rule="$rule---|"
printf '%s\n%s\n' "$head" "$rule"
for n in "${counts[@]}"; do
  admin_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  rm -rf "$work/state"
  config "$n" 5 > "$work/veer.toml"
  timeout $((idle + 260)) "$VEER" run --config "$work/veer.toml" > "$work/log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$admin_port/readyz" > /dev/null 2>&1 && break
    sleep 0.1
  done
  veer_pid=$(pgrep -P "$pid")   # `timeout` is the parent; veer its only child, whatever its name
  join=""
  if [ -n "${ETCD:-}" ]; then
    # A fleet's replica first takes a seat for each route's pool (a burst
    # of store writes); its canaries get traffic once seated.
    j0=$(date +%s.%N) c0=$(cpu_ticks "$veer_pid")
    for _ in $(seq 1 600); do
      # Read from the log, not /status: serving a 1000-route document
      # over and over would weigh on the RSS measured next.
      # A line a route, or one for many (`routes=N`).
      seated=$(awk '/canary seated/ { n += match($0, /routes=[0-9]+/) ? substr($0, RSTART + 7, RLENGTH - 7) : 1 } END { print n + 0 }' "$work/log")
      [ "$seated" -ge "$n" ] && break
      sleep 0.2
    done
    join=$(awk -v a="$j0" -v b="$(date +%s.%N)" -v d=$(($(cpu_ticks "$veer_pid") - c0)) -v hz="$tck" -v s="$seated" \
      'BEGIN { printf " %d seated in %.1f s, %.1f s of CPU |", s, b - a, d / hz }')
    sleep 10
  else
    sleep 5
  fi
  rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$veer_pid/status")
  t0=$(cpu_ticks "$veer_pid")
  sleep "$idle"
  t1=$(cpu_ticks "$veer_pid")
  cpu=$(awk -v d=$((t1 - t0)) -v hz="$tck" -v s="$idle" 'BEGIN { printf "%.2f %%", d / hz / s * 100 }')
  g0=$(generation)
  start=$(date +%s.%N)
  config "$n" 6 > "$work/veer.toml.new" && mv "$work/veer.toml.new" "$work/veer.toml"
  for _ in $(seq 1 1000); do
    [ "$(generation)" -gt "$g0" ] && break
    sleep 0.01
  done
  took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f s", b - a }')
  after=""
  if [ -n "${RELOADS:-}" ]; then
    # Waits on the log, not /status: a 1000-route document served over
    # and over would weigh on the RSS measured.
    for ((k = 1; k <= RELOADS; k++)); do
      a0=$(grep -c "reload accepted" "$work/log" || true)
      config "$n" $((k % 2 == 1 ? 5 : 6)) > "$work/veer.toml.new" && mv "$work/veer.toml.new" "$work/veer.toml"
      for _ in $(seq 1 500); do
        [ "$(grep -c "reload accepted" "$work/log" || true)" -gt "$a0" ] && break
        sleep 0.02
      done
      sleep 1
    done
    r1=$(awk '/VmRSS/ {print $2}' "/proc/$veer_pid/status")
    sleep 6
    after=" $((r1 / 1024)) MiB ($(($(awk '/VmRSS/ {print $2}' "/proc/$veer_pid/status") / 1024)) MiB) |"
  fi
  if [ -n "${REBUILDS:-}" ]; then
    token=$(cat "$work/state/admin.token")
    rebuilds() { curl -s "http://127.0.0.1:$admin_port/metrics" | awk '/^veer_routing_rebuilds_total/ {print $2}'; }
    r0=$(rebuilds) c0=$(cpu_ticks "$veer_pid")
    for ((k = 0; k < REBUILDS; k++)); do
      for action in pause resume; do
        curl -s -X POST -H "Authorization: Bearer $token" "http://127.0.0.1:$admin_port/routes/r0/$action" > /dev/null
      done
    done
    c1=$(cpu_ticks "$veer_pid") r1=$(rebuilds)
    after="$after $(awk -v d=$((c1 - c0)) -v hz="$tck" -v r=$((r1 - r0)) 'BEGIN { printf "%.1f ms (%d rebuilds)", d / hz * 1000 / (r > 0 ? r : 1), r }') |"
  fi
  printf '| %d |%s %d MiB | %s | %s |%s\n' "$n" "$join" $((rss_kb / 1024)) "$cpu" "$took" "$after"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
done
