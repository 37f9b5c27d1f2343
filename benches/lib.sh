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

# In the current directory (an empty work directory, named $1 for
# openssl's paths): a client CA (ca.crt, ca.key), a server certificate for
# localhost (tls.crt, tls.key), client certificates good.crt/.key (serial
# 0A0B0C) and revoked.crt/.key (0D0E0F), and ca.cnf for revocation_list.
client_ca_files() {
  local work="$1"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj "/CN=bench-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout ca.key -out ca.crt 2>/dev/null
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost" -keyout tls.key -out tls.crt 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' > client.ext
  for who in good revoked; do
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$who" \
      -keyout "$who.key" -out "$who.csr" 2>/dev/null
  done
  openssl x509 -req -in good.csr -CA ca.crt -CAkey ca.key -set_serial 0x0A0B0C -days 30 \
    -extfile client.ext -out good.crt 2>/dev/null
  openssl x509 -req -in revoked.csr -CA ca.crt -CAkey ca.key -set_serial 0x0D0E0F -days 30 \
    -extfile client.ext -out revoked.crt 2>/dev/null
  printf '[ca]\ndefault_ca = d\n[d]\ndatabase = %s/index.txt\ncrlnumber = %s/crlnumber\ndefault_md = sha256\ndefault_crl_days = 7\n' \
      "$work" "$work" > ca.cnf
}

# crl.pem in the current directory (after client_ca_files): a revocation
# list of $1 serials, revoked.crt's among them (none when 0), never
# good.crt's.
revocation_list() {
  local n="$1"
  # The revoked client's serial, then n - 1 others (never the good one's).
  python3 - "$n" > index.txt <<'PY'
import sys
n = int(sys.argv[1])
lines = []
if n > 0:
  lines.append("R\t301231000000Z\t250101000000Z\t0D0E0F\tunknown\t/CN=revoked")
for i in range(1, n):
  lines.append(f"R\t301231000000Z\t250101000000Z\t{0x10000000 + i:08X}\tunknown\t/CN=c{i}")
print("\n".join(lines) + ("\n" if lines else ""), end="")
PY
  echo 01 > crlnumber
  openssl ca -gencrl -config ca.cnf -keyfile ca.key -cert ca.crt -out crl.pem 2>/dev/null
}

# veer.toml in the current directory, for the TLS scripts: a plain and a
# TLS listener on free ports ($plain and $tls, set here, with $admin), 2
# workers, the TLS table's certificate $1 and key $2 and the lines $3, one
# route on path prefix $4 whose stable endpoint is the discard port
# (127.0.0.1:9: a request the route takes gets 502), state in ./state.
tls_bench_config() {
  plain=$(free_port); tls=$(free_port); admin=$(free_port)
  rm -rf state
  cat > veer.toml <<TOML
[proxy]
listen = ["127.0.0.1:$plain"]
workers = 2
[proxy.tls]
listen = ["127.0.0.1:$tls"]
cert = "$1"
key = "$2"
$3
[admin]
listen = "127.0.0.1:$admin"
[state]
dir = "$PWD/state"
[[route]]
name = "app"
path_prefix = "$4"
[route.stable]
version = "v1"
endpoints = ["127.0.0.1:9"]
TOML
}
