#!/usr/bin/env bash
# What a TLS client connection costs veer when the client comes back: N
# clients (each its own TLS session store, Python's ssl) connect once, then
# each connects again offering its session; for an ECDSA P-256 and an RSA
# 2048 certificate (cert-manager's default key), over TLS 1.3 and 1.2,
# prints how many came back resumed and veer's CPU (user + system, from
# /proc) a connection in each phase. Each connection sends one request
# (`Connection: close`) that no route takes: 404 from veer itself, so the
# figures are the handshake's and the connection's, no upstream's.
#
# usage: benches/tls-resume.sh [N]   (default 1000; VEER=binary to measure
# another build, as the other scripts)
# CRL_SERIALS=S: mutual TLS too, the clients presenting a certificate
# (the same one) that veer checks against a client CA and a revocation
# list of S serials (`[proxy.tls] client_ca`, `client_crl`; see
# tls-crl.sh): what a returning client saves of that check.
# TLS_EXTRA='...': more [proxy.tls] lines (say 'session_tickets = false',
# 'session_cache = 0'). CLIENT_TICKETS=0: the clients take no TLS 1.2
# ticket (OpenSSL's OP_NO_TICKET; they resume by session ID, as Java's
# before JDK 13). The last column is veer's resident memory after both
# phases (the sessions it holds).
# Only 127.0.0.1 is targeted; every loop is bounded (N connections a phase,
# 5 s a connection).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
veer_binary
command -v openssl >/dev/null || { echo "openssl is needed" >&2; exit 1; }
n="${1:-1000}"
work="$(mktemp -d)"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
mtls=""
if [ -n "${CRL_SERIALS:-}" ]; then
  client_ca_files "$work"
  revocation_list "$CRL_SERIALS"
  mtls="client_ca = \"$work/ca.crt\"
client_crl = \"$work/crl.pem\""
fi
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost" -keyout ec.key -out ec.crt 2>/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost" -keyout rsa.key -out rsa.crt 2>/dev/null
cat > clients.py <<'PY'
import os, socket, ssl, sys
pid, port, n, version = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
if os.path.exists("crl.pem"):
    ctx.load_cert_chain("good.crt", "good.key")
if os.environ.get("CLIENT_TICKETS") == "0":
    ctx.options |= ssl.OP_NO_TICKET
if version == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
else:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
def rss_mib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
def connect(session=None):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = ctx.wrap_socket(s, server_hostname="localhost", session=session)
    t.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    while t.recv(65536):
        pass
    got = (t.session, t.session_reused)
    t.close()
    return got
c0 = cpu()
sessions = [connect()[0] for _ in range(n)]
c1 = cpu()
resumed = sum(connect(s)[1] for s in sessions)
c2 = cpu()
print(f"{1e6 * (c1 - c0) / n:.0f} us | {resumed} of {n} | {1e6 * (c2 - c1) / n:.0f} us | {rss_mib():.1f} MiB |")
PY
echo "| certificate | TLS | first connection | came back resumed | connection back | veer RSS |"
echo "|---|---|---|---|---|---|"
for key in ec rsa; do
  tls_bench_config "$work/$key.crt" "$work/$key.key" "$mtls
${TLS_EXTRA:-}" /app
  start_measured veer.toml log "$admin"
  name=$([ "$key" = ec ] && echo "ECDSA P-256" || echo "RSA 2048")
  for version in 1.3 1.2; do
    echo "| $name | $version | $(python3 clients.py "$pid" "$tls" "$n" "$version")"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
done
