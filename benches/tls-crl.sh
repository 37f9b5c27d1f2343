#!/usr/bin/env bash
# What a large client certificate revocation list ([proxy.tls] client_crl)
# costs: for each N given, a CA (openssl) whose CRL revokes N serials, one of
# them a client certificate's; veer started with client_ca and client_crl;
# prints the CRL's size, the time until /readyz answers, the RSS a second
# later, how long 100 handshakes of a good client certificate took in all
# (curl, one process each: mostly curl's own start), and whether all of them
# were served and the revoked certificate refused.
#
# usage: benches/tls-crl.sh N...   (default 0 10000 100000; VEER=binary)
# Only 127.0.0.1 is targeted; every loop is bounded.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
veer_binary
command -v openssl >/dev/null || { echo "openssl is needed" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }
sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(0 10000 100000)
work="$(mktemp -d)"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
client_ca_files "$work"
echo "| revoked serials | CRL | ready after | RSS | 100 good handshakes | served / refused |"
echo "|---|---|---|---|---|---|"
for n in "${sizes[@]}"; do
  revocation_list "$n"
  tls_bench_config "$work/tls.crt" "$work/tls.key" "client_ca = \"$work/ca.crt\"
client_crl = \"$work/crl.pem\"" /
  start_measured veer.toml log "$admin"
  served=0
  h0=$(date +%s%N)
  for _ in $(seq 1 100); do
    code=$(curl -sk --max-time 5 --cert good.crt --key good.key "https://127.0.0.1:$tls/" -o /dev/null -w '%{http_code}' || true)
    [ "$code" != "000" ] && served=$((served + 1))
  done
  h1=$(date +%s%N)
  code=$(curl -sk --max-time 5 --cert revoked.crt --key revoked.key "https://127.0.0.1:$tls/" -o /dev/null -w '%{http_code}' || true)
  if [ "$n" -gt 0 ]; then
    refused=$([ "$code" = "000" ] && echo refused || echo "SERVED ($code)")
  else
    refused="n/a (not in the list)"
  fi
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  echo "| $n | $(awk -v b="$(stat -c %s crl.pem)" 'BEGIN { printf "%.1f KiB", b / 1024 }') | $ready_ms ms | $rss_mib MiB | $(( (h1 - h0) / 1000000 )) ms | $served of 100 / $refused |"
done
