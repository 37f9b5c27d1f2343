#!/usr/bin/env bash
# What many certificates picked by name ([[proxy.tls.certificates]]) cost:
# for each N given, N self-signed P-256 certificates (openssl; host hI.example
# and *.hI.example), veer started with the first as the default and the others
# by name; prints the time until /readyz answers, the RSS a second later, and
# how many of 200 handshakes (openssl s_client, each naming x.hJ.example for a
# J spread over the list: the wildcards) were given the right certificate.
#
# usage: benches/tls-certs.sh N...   (default 1 100 1000; VEER=binary)
# Only 127.0.0.1 is targeted; every loop is bounded.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
veer_binary
command -v openssl >/dev/null || { echo "openssl is needed" >&2; exit 1; }
sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(1 100 1000)
max=0
for n in "${sizes[@]}"; do [ "$n" -gt "$max" ] && max=$n; done
work="$(mktemp -d)"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for i in $(seq 1 "$max"); do
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=h$i.example" -addext "subjectAltName=DNS:h$i.example,DNS:*.h$i.example" \
    -keyout "$work/h$i.key" -out "$work/h$i.crt" 2>/dev/null
done
echo "| certificates | ready after | RSS | right certificate |"
echo "|---|---|---|---|"
for n in "${sizes[@]}"; do
  plain=$(free_port); tls=$(free_port); admin=$(free_port)
  rm -rf "$work/state"
  {
    printf '[proxy]\nlisten = ["127.0.0.1:%s"]\nworkers = 2\n' "$plain"
    printf '[proxy.tls]\nlisten = ["127.0.0.1:%s"]\ncert = "%s/h1.crt"\nkey = "%s/h1.key"\n' "$tls" "$work" "$work"
    for i in $(seq 2 "$n"); do
      printf '[[proxy.tls.certificates]]\ncert = "%s/h%s.crt"\nkey = "%s/h%s.key"\n' "$work" "$i" "$work" "$i"
    done
    printf '[admin]\nlisten = "127.0.0.1:%s"\n[state]\ndir = "%s/state"\n' "$admin" "$work"
    printf '[[route]]\nname = "web"\n[route.stable]\nversion = "v1"\nendpoints = ["127.0.0.1:9"]\n'
  } > "$work/veer.toml"
  start_measured "$work/veer.toml" "$work/log" "$admin"
  ok=0
  for i in $(seq 1 200); do
    h=$(( (i * 37) % n + 1 ))
    s=$(echo | timeout 5 openssl s_client -connect "127.0.0.1:$tls" -servername "x.h$h.example" 2>/dev/null \
      | openssl x509 -noout -subject 2>/dev/null || true)
    [ "$s" = "subject=CN = h$h.example" ] && ok=$((ok + 1))
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  echo "| $n | $ready_ms ms | $rss_mib MiB | $ok of 200 |"
done
