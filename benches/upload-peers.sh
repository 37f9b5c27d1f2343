#!/usr/bin/env bash
# benches/peers.sh with uploads: every request is a POST of an N-byte body
# (default 1024) with the same random x-user-id keys, side by side with
# nginx and HAProxy as the shared peer script runs them. The shared script
# and its configs are copied to a scratch dir and only the wrk script's
# method and body changed; the origins (nginx `return 200`) discard the
# bodies and keep their connections.
#
# usage: benches/upload-peers.sh [-u N] [benches/peers.sh options]
#   e.g. RUN_DIR=/tmp/up benches/upload-peers.sh -u 1024 -r 5 -d 8 -n -s
# Only 127.0.0.1 is targeted; every run is bounded by wrk's duration.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
shared="$HERE/../../shared/bench"
[ -f "$shared/peers.sh" ] || { echo "peer script not found: $shared/peers.sh" >&2; exit 1; }
bytes=1024
if [ "${1:-}" = -u ]; then
  bytes=$2
  shift 2
fi
copy=$(mktemp -d /tmp/veer-upload-peers.XXXXXX)
trap 'rm -rf "$copy"' EXIT
cp -r "$shared/." "$copy/"
# shellcheck source=benches/pinned-lib.sh
. "$HERE/pinned-lib.sh"
make_posts "$copy/peers/wrk-userid.lua" "$bytes"
echo "uploads: POST with a $bytes-byte body" >&2
PEERS="$copy/peers.sh" "$HERE/peers.sh" "$@"
