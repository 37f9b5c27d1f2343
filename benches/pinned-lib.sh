# Shared by benches/load-profile.sh and benches/pgo.sh (sourced, not run):
# the shared peers' nginx origin and veer's bench route, as benches/peers.sh
# sets them up. The caller sets $peers (the shared peer configs) and calls
# pinned_run first.

# Ports from BASE (origin stable +1, canary +2, proxy +13, veer's admin
# +14), a scratch dir $work, and the pids to stop on exit; the function
# named by $on_exit (if any) runs before $work is removed.
pinned_run() { # base
  stable=$(($1 + 1)) canary=$(($1 + 2)) port=$(($1 + 13)) admin=$(($1 + 14))
  work="$(mktemp -d)"
  pids=()
  trap pinned_cleanup EXIT
}
pinned_cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  [ -n "${on_exit:-}" ] && "$on_exit"
  rm -rf "$work"
}

# A peer template with this run's values: 1 worker, the canary at 20 %.
fill() { # template -> stdout
  sed -e "s#@RUN@#$work#g" -e "s#@WORKERS@#1#g" -e "s#@STABLE_PORT@#$stable#g" \
    -e "s#@CANARY_PORT@#$canary#g" -e "s#@NGINX_PORT@#$port#g" -e "s#@CANARY_PCT@#20#g" \
    -e "s#master_process on#master_process off#" "$peers/$1"
}

# Starts the origin (3-byte answers) with the prefix given (e.g. taskset).
start_origin() { # [prefix...]
  fill nginx-upstream.conf > "$work/origin.conf"
  printf 'return 200 "ok\\n";\n' > "$work/body.inc"
  cp "$peers/wrk-userid.lua" "$work/"
  "$@" nginx -p "$work" -c "$work/origin.conf" -e "$work/origin.err" &
  pids+=($!)
}

# veer's config: one route keyed as the peers key, the canary at 20 %.
veer_config() { # judge-mode -> $work/veer.toml
  cat > "$work/veer.toml" << TOML
[proxy]
listen = ["127.0.0.1:$port"]
workers = 1
[admin]
listen = "127.0.0.1:$admin"
[state]
dir = "$work/state"
[[route]]
name = "bench"
sticky = ["header:x-user-id", "client-ip"]
[route.stable]
version = "stable"
endpoints = ["127.0.0.1:$stable"]
[route.canary]
version = "canary"
endpoints = ["127.0.0.1:$canary"]
weight = 20
[route.judge]
mode = "$1"
TOML
}

# Polls until every port given accepts a connection (10 s each at most).
wait_ports() { # port...
  local p
  for p in "$@"; do
    for _ in $(seq 100); do
      (exec 3<> "/dev/tcp/127.0.0.1/$p") 2> /dev/null && break
      sleep 0.1
    done
  done
}

# Makes the peers' wrk script (a copy, at $1) send POSTs of $2 bytes
# instead of GETs, the same random keys (benches/upload-peers.sh and
# load-profile.sh's UPLOAD).
make_posts() { # lua bytes
  case $2 in '' | *[!0-9]*) echo "an upload takes a byte count, not '$2'" >&2; return 1 ;; esac
  sed -i "s|wrk.format(\"GET\", \"/\", { \[\"x-user-id\"\] = \"user-\" .. math.random(1, 1000000) })|wrk.format(\"POST\", \"/\", { [\"x-user-id\"] = \"user-\" .. math.random(1, 1000000) }, string.rep(\"x\", $2))|" "$1"
  grep -q 'wrk.format("POST"' "$1" || { echo "the shared wrk script changed; cannot make it POST" >&2; return 1; }
}
