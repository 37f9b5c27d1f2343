#!/usr/bin/env bash
# Builds the release veer binary the image ships (deploy/container) or a
# host runs (deploy/systemd): profile-guided by default (PGO=0: the plain
# `cargo build --release` for TARGET):
#   1. a release build instrumented to count which code runs
#      (-Cprofile-generate);
#   2. a training run (benches/pgo_train.rs, built first): the
#      instrumented binary runs config.example.toml (the judge as shipped)
#      plus a TLS listener and gRPC, HTTPS-upstream and mirrored routes, in
#      front of upstreams of its own, carrying every protocol veer serves at
#      once: HTTP/1.1 (keep-alive and not, bodies both ways, chunked
#      uploads), h2c and gRPC, HTTP/2 and HTTP/1.1 over TLS, h2 over TLS to
#      upstreams; half the time with workers = 1, half with one per core.
#      It is stopped with SIGTERM and writes the counts as it exits;
#   3. the counts merged with the toolchain's llvm-profdata;
#   4. the release build that uses them (-Cprofile-use): hot code laid out
#      together, cold code apart, branches and inlining by the counts.
# The source, the features and the behaviour are those of the plain build;
# only the machine code's layout and inlining differ. What it buys, path by
# path: benches/RESULTS.md, "Session 33". (Session 32 trained with `veer
# demo`, HTTP/1.1 only: the paths it did not see got slower, gRPC calls by
# 16 %; the training now takes every path.)
#
# usage: deploy/build-veer.sh TARGET OUT
#   TARGET: the Rust target triple (--target: RUSTFLAGS then stay off build
#   scripts and proc macros); OUT: where the binary is copied.
# env: RUSTFLAGS (the base flags, e.g. -C target-feature=+crt-static),
#   PGO (1, the default: profile-guided; 0: plain), TRAIN_SECONDS (20),
#   TRAIN_WITH (another training: a command run as `CMD BIN SECONDS` with
#   the instrumented binary; benches/pgo.sh trains with wrk this way),
#   PGO_DIR (where the instrumented build, counts and PGO build live;
#   default target/pgo: their own target dirs, so neither rebuilds the
#   other's artifacts, nor those of `cargo build`).
# The profile-guided build needs rustup's llvm-tools component (added here
# if missing) for llvm-profdata of the same LLVM as rustc; a toolchain
# without rustup builds with PGO=0. Only 127.0.0.1 is targeted;
# the training is bounded by its duration and a timeout.
set -euo pipefail
[ $# -eq 2 ] || { sed -n '2,37p' "$0"; exit 2; }
target=$1 out=$2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
base="${RUSTFLAGS:-}"
build() { # target-dir extra-rustflags
  RUSTFLAGS="$base $2" CARGO_TARGET_DIR="$1" \
    cargo build --release --locked -q --target "$target" -p veer-proxy --bin veer
}
if [ "${PGO:-1}" != 1 ]; then
  build target ""
  install -D -m 0755 "target/$target/release/veer" "$out"
  exit 0
fi

dir="${PGO_DIR:-$ROOT/target/pgo}"
host=$(rustc -vV | awk '/^host:/ {print $2}')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  command -v rustup > /dev/null \
    || { echo "llvm-profdata not found and no rustup to add llvm-tools: PGO=0 builds without a profile" >&2; exit 1; }
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
  # The training driver (benches/pgo_train.rs), a plain build for the host:
  # upstreams and clients of every protocol veer serves, on 127.0.0.1.
  echo "PGO 2/4: training: pgo-train (every protocol, ${secs}s)" >&2
  RUSTFLAGS="" CARGO_TARGET_DIR="$dir/train" \
    cargo build --release --locked -q -p veer-benches --bin pgo-train
  if ! RUST_BACKTRACE=0 timeout $((secs + 120)) "$dir/train/release/pgo-train" "$gen" "$secs" \
    > "$dir/train.log" 2>&1; then
    echo "the training run failed; its output ends:" >&2
    tail -20 "$dir/train.log" >&2
    exit 1
  fi
  cat "$dir/train.log" >&2
fi
ls "$dir/counts"/*.profraw > /dev/null 2>&1 || { echo "the training run wrote no counts" >&2; exit 1; }
echo "PGO 3/4: merging the counts" >&2
"$profdata" merge -o "$dir/merged.profdata" "$dir/counts"
echo "PGO 4/4: optimized build" >&2
build "$dir/use" "-Cprofile-use=$dir/merged.profdata"
install -D -m 0755 "$dir/use/$target/release/veer" "$out"
