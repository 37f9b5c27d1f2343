#!/usr/bin/env bash
# Fuzzes the config parser and request-head handling (fuzz/fuzz_targets:
# config, request_head) with cargo fuzz (libFuzzer), each for SECS seconds,
# and reports executions and crashes; then reads CASES mangled upstream
# answers both the raw way (proxy/src/raw.rs) and with hyper's client, and
# fails on any answer the two read differently (the suite reads 256 of
# them); and 50 times CASES gRPC health answers both veer's way
# (proxy/src/grpc.rs) and with prost's generated decoder (the suite reads
# 2 048). Not part of CI's test run.
#
# usage: benches/fuzz.sh [SECS] [CASES]   (defaults: 300 per target, 20000 answers)
#
# cargo fuzz needs nightly flags (-Zsanitizer); this machine has one stable
# toolchain, so the build runs with RUSTC_BOOTSTRAP=1. The corpora start
# from the repository's own configs and a few request heads
# (target/fuzz-corpus, kept between runs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs="${1:-300}"
cases="${2:-20000}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
corpus="$ROOT/target/fuzz-corpus"
mkdir -p "$corpus/config" "$corpus/request_head"
i=0
for f in "$ROOT"/config.example.toml "$ROOT"/deploy/systemd/veer.toml "$ROOT"/tests/data/*/*.toml; do
  [ -f "$f" ] && cp "$f" "$corpus/config/seed-$((i++))"
done
# Configs embedded in the Kubernetes ConfigMaps (the TOML under `veer.toml: |`).
for f in "$ROOT"/deploy/kubernetes/*/configmap.yaml; do
  sed -n '/veer.toml: |/,$p' "$f" | tail -n +2 | sed 's/^    //' > "$corpus/config/seed-$((i++))"
done
printf '/\nhost: a\n' > "$corpus/request_head/get"
printf 'http://a.example/x/../y?q=1\nhost: a.example\nconnection: keep-alive, x-a\nx-a: 1\nte: gzip, trailers\n' > "$corpus/request_head/absolute"
printf '/t/%%2e%%2e/%%41dmin\nx-forwarded-for: 10.0.0.1, 10.0.0.2\nx-forwarded-for: 10.0.0.3\ncookie: a=b; session=s1\nx-user-id: u7\n' > "$corpus/request_head/forwarded"
printf '/ws\nconnection: upgrade\nupgrade: websocket\nhost: a\nhost: b\n' > "$corpus/request_head/upgrade"
cd "$ROOT/fuzz"
export RUSTC_BOOTSTRAP=1
status=0
for target in config request_head; do
  log="$ROOT/target/fuzz-$target.log"
  printf '\n==> %s for %s s\n' "$target" "$secs"
  if cargo fuzz run "$target" "$corpus/$target" -- -max_total_time="$secs" -print_final_stats=1 > "$log" 2>&1; then
    echo "no crash"
  else
    status=1
    echo "CRASH: see $log and fuzz/artifacts/$target/"
    grep -E "panicked|SUMMARY" "$log" | head -5
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$log" || true
  echo "corpus: $(ls "$corpus/$target" | wc -l) inputs"
done
# Reads N mangled inputs with a fixed seed (as in the suite, whose first
# ones they are) through a differential property test.
differential() { # WHAT TEST N LOG
  printf '\n==> %s %s\n' "$3" "$1"
  if (cd "$ROOT" && PROPTEST_CASES="$3" cargo test -q -p veer-proxy --lib "$2" > "$4" 2>&1); then
    echo "read alike"
  else
    status=1
    echo "READ UNLIKE: see $4"
    grep -E "panicked|minimal failing input" "$4" | head -5
  fi
}
differential "mangled answers, raw against hyper" answers_are_read_as_hypers_client_reads_them \
  "$cases" "$ROOT/target/fuzz-raw-answers.log"
differential "mangled gRPC health answers, veer against prost" health_answers_are_read_as_prost_reads_them \
  "$((cases * 50))" "$ROOT/target/fuzz-grpc-health.log"
exit $status
