#!/usr/bin/env bash
# Builds the release veer binary the image ships (deploy/container) or a
# host runs (deploy/systemd): `cargo build --release` for TARGET, or with
# PGO=1 profile-guided:
#   1. a release build instrumented to count which code runs
#      (-Cprofile-generate);
#   2. a training run: `veer demo` (the self-contained demo: two upstreams,
#      the proxy with the judge on and clients with sticky keys, all on
#      127.0.0.1 ports the kernel picks; the canary turns bad and veer
#      reverts it), which writes the counts when it exits;
#   3. the counts merged with the toolchain's llvm-profdata;
#   4. the release build that uses them (-Cprofile-use): hot code laid out
#      together, cold code apart, branches and inlining by the counts.
# The source, the features and the behaviour are those of the plain build;
# only the machine code's layout and inlining differ. The trade-off
# (benches/RESULTS.md, "Session 32"): the demo's traffic is HTTP/1.1, and
# what it trains gets faster (GETs ~20 % fewer instructions, 1 KiB POSTs
# ~13 %) while what it does not see gets slower (gRPC over h2c ~16 % more
# instructions a call, h2 clients over TLS ~10 % more a request). So it is
# not the default: use it for a service whose clients and upstreams speak
# HTTP/1.1.
#
# usage: deploy/build-veer.sh TARGET OUT
#   TARGET: the Rust target triple (--target: RUSTFLAGS then stay off build
#   scripts and proc macros); OUT: where the binary is copied.
# env: RUSTFLAGS (the base flags, e.g. -C target-feature=+crt-static),
#   PGO=1 (profile-guided; default 0, plain), TRAIN_SECONDS (20),
#   TRAIN_WITH (another training: a command run as `CMD BIN SECONDS` with
#   the instrumented binary; benches/pgo.sh trains with wrk this way),
#   PGO_DIR (where the instrumented build, counts and PGO build live;
#   default target/pgo: their own target dirs, so neither rebuilds the
#   other's artifacts, nor those of `cargo build`).
# PGO=1 needs rustup's llvm-tools component (installed here if missing)
# for llvm-profdata of the same LLVM as rustc. Only 127.0.0.1 is targeted;
# the training is bounded by its duration and a timeout.
set -euo pipefail
[ $# -eq 2 ] || { sed -n '2,35p' "$0"; exit 2; }
target=$1 out=$2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
base="${RUSTFLAGS:-}"
build() { # target-dir extra-rustflags
  RUSTFLAGS="$base $2" CARGO_TARGET_DIR="$1" \
    cargo build --release --locked -q --target "$target" -p veer-proxy --bin veer
}
if [ "${PGO:-0}" != 1 ]; then
  build target ""
  install -D -m 0755 "target/$target/release/veer" "$out"
  exit 0
fi

dir="${PGO_DIR:-$ROOT/target/pgo}"
host=$(rustc -vV | awk '/^host:/ {print $2}')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  command -v rustup > /dev/null \
    || { echo "llvm-profdata not found and no rustup to add llvm-tools (PGO=0 builds without a profile)" >&2; exit 1; }
  rustup component add llvm-tools > /dev/null
fi
[ -x "$profdata" ] || { echo "llvm-profdata not found at $profdata" >&2; exit 1; }

mkdir -p "$dir"
rm -rf "$dir/counts" "$dir/merged.profdata"
echo "PGO 1/4: instrumented build" >&2
build "$dir/gen" "-Cprofile-generate=$dir/counts"
secs="${TRAIN_SECONDS:-20}"
gen="$dir/gen/$target/release/veer"
if [ -n "${TRAIN_WITH:-}" ]; then
  echo "PGO 2/4: training: $TRAIN_WITH" >&2
  # Word-split on purpose: a command and its arguments.
  # shellcheck disable=SC2086
  timeout $((secs + 120)) $TRAIN_WITH "$gen" "$secs" || { echo "the training run failed" >&2; exit 1; }
else
  echo "PGO 2/4: training: veer demo --duration ${secs}s" >&2
  if ! RUST_LOG=warn timeout $((secs + 60)) "$gen" demo --duration "${secs}s" \
    > "$dir/demo.log" 2>&1; then
    echo "the training run failed; its output ends:" >&2
    tail -5 "$dir/demo.log" >&2
    exit 1
  fi
  grep -E '^demo done' "$dir/demo.log" >&2 || true
fi
ls "$dir/counts"/*.profraw > /dev/null 2>&1 || { echo "the training run wrote no counts" >&2; exit 1; }
echo "PGO 3/4: merging the counts" >&2
"$profdata" merge -o "$dir/merged.profdata" "$dir/counts"
echo "PGO 4/4: optimized build" >&2
build "$dir/use" "-Cprofile-use=$dir/merged.profdata"
install -D -m 0755 "$dir/use/$target/release/veer" "$out"
