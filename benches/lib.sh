# Shared by the bench scripts (sourced, not run); the caller sets $ROOT,
# the repository.

# $VEER: the veer binary to measure, as given (another build, e.g. an
# older commit's), or else the release build, built now.
veer_binary() {
  if [ -z "${VEER:-}" ]; then
    cargo build --release --locked -q -p veer-proxy --bin veer
    VEER="${CARGO_TARGET_DIR:-$ROOT/target}/release/veer"
  fi
}

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts "$VEER" run --config $1 (its log to $2), then polls
# http://127.0.0.1:$3/readyz every 10 ms for up to 10 s; sets $pid,
# $ready_ms (start to ready) and, a second later, $rss_mib.
start_measured() {
  local t0 t1
  t0=$(date +%s%N)
  "$VEER" run --config "$1" > "$2" 2>&1 &
  pid=$!
  for _ in $(seq 1 1000); do
    curl -sf "http://127.0.0.1:$3/readyz" > /dev/null 2>&1 && break
    sleep 0.01
  done
  t1=$(date +%s%N)
  ready_ms=$(( (t1 - t0) / 1000000 ))
  sleep 1
  rss_mib=$(( $(awk '/VmRSS/ {print $2}' "/proc/$pid/status") / 1024 ))
}
