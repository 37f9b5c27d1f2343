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
