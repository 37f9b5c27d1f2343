#!/usr/bin/env bash
# Builds veer's production image offline with Debian's podman, then runs it:
# `veer --version`, and `veer run` with a mounted config answering /healthz
# from the host, as a non-root user, with a read-only root filesystem.
#
# No registry is needed: the binary is compiled here as a static-pie
# (glibc's crt-static: no libc in the image; name lookups through /etc/hosts
# and DNS still work, glibc >= 2.34 has them built in) and the image is
# FROM scratch (deploy/container/Dockerfile with BINARY_FROM=prebuilt).
#
# The binary is profile-guided (deploy/build-veer.sh: an instrumented build
# trained on every protocol veer serves, then the build that uses its
# counts); PGO=0 builds it plain.
#
# usage: deploy/container/build.sh [TAG]      (default localhost/veer:VERSION)
# Installs podman and runc with apt if missing. Images live in
# target/container/storage (not the system's). Only 127.0.0.1 is targeted.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
step() { printf '\n--> %s\n' "$*"; }
cd "$ROOT"

if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
  step "apt-get install podman runc"
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc >/dev/null
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag="${1:-localhost/veer:$version}"
work="$ROOT/target/container"
mkdir -p "$work"

# podman's defaults fail here: crun is not installed, and the default
# ulimits exceed what the machine allows (every `podman run` would fail on
# setrlimit).
hard=$(ulimit -Hn)
cat > "$work/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$hard:$hard", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$work/containers.conf"
podman=(podman --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
# podman runs HEALTHCHECKs from systemd timers, and there is no systemd
# here: the runs below set no timer, and the check is run by hand.
nohc=(--health-interval disable)
# (podman 4.3 still complains that it cannot reach systemd: those two lines
# are dropped, any other message shows.)
quiet() { "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }

step "static veer (x86_64-unknown-linux-gnu, crt-static)${PGO:+, PGO=$PGO}"
RUSTFLAGS='-C target-feature=+crt-static' PGO_DIR="$work/pgo" \
  "$ROOT/deploy/build-veer.sh" x86_64-unknown-linux-gnu "$work/veer"
ctx="$work/context"
rm -rf "$ctx"
mkdir -p "$ctx/prebuilt/state" "$ctx/prebuilt/config"
install -m 0755 -s "$work/veer" "$ctx/prebuilt/veer"
if readelf -d "$ctx/prebuilt/veer" | grep -q NEEDED; then
  echo "the binary is dynamically linked; a FROM scratch image cannot run it" >&2
  exit 1
fi

step "podman build $tag (FROM scratch, no registry)"
"${podman[@]}" build --quiet --format docker --pull=never \
  --build-arg BINARY_FROM=prebuilt --build-arg RUNTIME_IMAGE=scratch \
  -f "$HERE/Dockerfile" -t "$tag" "$ctx" >/dev/null
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$tag")
printf 'image %s: %.1f MiB\n' "$tag" "$(echo "$size / 1048576" | bc -l)"
user=$("${podman[@]}" image inspect --format '{{.Config.User}}' "$tag")
[ "$user" = "65532:65532" ] || { echo "image user is '$user', not 65532:65532" >&2; exit 1; }
"${podman[@]}" image inspect --format '{{.Config.Healthcheck}}' "$tag" | grep -q 'veer health' \
  || { echo "the image has no HEALTHCHECK (built without --format docker?)" >&2; exit 1; }

step "podman run $tag --version"
quiet "${podman[@]}" run --rm --read-only "${nohc[@]}" "$tag" --version

step "podman run: veer run with a mounted config, /healthz from the host"
# Two ports picked together (both held while picked), so never the same.
read -r admin_port proxy_port < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')
cfg="$work/run-config"
rm -rf "$cfg"
mkdir -p "$cfg"
# The admin port listens on the container's address, so actions need a
# token: a file only the container's user can read.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$cfg/token"
chown 65532:65532 "$cfg/token"
chmod 0400 "$cfg/token"
cat > "$cfg/veer.toml" <<'EOF'
[proxy]
listen = ["0.0.0.0:8080"]
[admin]
listen = "0.0.0.0:9901"
token_file = "/etc/veer/token"
[state]
dir = "/var/lib/veer"
[[route]]
name = "web"
[route.stable]
version = "v1"
endpoints = ["localhost:18001"]
[route.canary]
version = "v2"
endpoints = ["localhost:18002"]
weight = 10
EOF
name="veer-build-check-$$"
volume="veer-build-check-state-$$"
cleanup() {
  "${podman[@]}" rm -f -t 0 "$name" >/dev/null 2>&1 || true
  "${podman[@]}" volume rm -f "$volume" >/dev/null 2>&1 || true
}
trap cleanup EXIT
quiet "${podman[@]}" run -d --name "$name" --read-only "${nohc[@]}" \
  -p "127.0.0.1:$proxy_port:8080" -p "127.0.0.1:$admin_port:9901" \
  -v "$cfg/veer.toml:/etc/veer/veer.toml:ro" -v "$cfg/token:/etc/veer/token:ro" \
  -v "$volume:/var/lib/veer" \
  "$tag" >/dev/null
ok=0
for _ in $(seq 1 100); do
  if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin_port/healthz")" = 200 ]; then
    ok=1
    break
  fi
  sleep 0.1
done
if [ "$ok" != 1 ]; then
  "${podman[@]}" logs "$name" >&2 || true
  echo "/healthz never answered from the host" >&2
  exit 1
fi
echo "/healthz answered 200 from the host (127.0.0.1:$admin_port)"
pid=$("${podman[@]}" inspect --format '{{.State.Pid}}' "$name")
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[ "$uid" = 65532 ] || { echo "veer runs as uid $uid, not 65532" >&2; exit 1; }
echo "veer runs as uid $uid, read-only root filesystem"
# The state dir (a named volume) is writable: veer wrote its decisions there.
mount=$("${podman[@]}" volume inspect --format '{{.Mountpoint}}' "$volume")
[ -s "$mount/state.json" ] || { echo "veer wrote no state.json to its state volume" >&2; exit 1; }
echo "the state volume is writable (state.json written as uid $(stat -c %u "$mount/state.json"))"
"${podman[@]}" healthcheck run "$name" \
  && echo "the image's HEALTHCHECK passes (podman healthcheck run)" \
  || { echo "the image's HEALTHCHECK failed" >&2; exit 1; }
curl -s -o /dev/null -w '' "http://127.0.0.1:$proxy_port/" || true
echo "built and ran $tag ($(printf '%.1f' "$(echo "$size / 1048576" | bc -l)") MiB)"
