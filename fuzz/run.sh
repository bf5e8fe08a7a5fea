#!/usr/bin/env bash
# Runs every fuzz target: `fuzz/run.sh smoke` (CI: 10 s each) or `fuzz/run.sh long`
# (at least 10^7 executions each, the figures in docs/fuzzing.md). Needs the nightly
# toolchain and cargo-fuzz (`cargo install cargo-fuzz`). A crash stops the run and leaves
# its input in fuzz/artifacts/TARGET/; every crash becomes a regression test in the crate
# whose decoder failed.
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-smoke}"
targets=(frames messages handshake codecs sidecar state_blobs nbd)
cargo +nightly fuzz build
for t in "${targets[@]}"; do
  case "$mode" in
    smoke) args=(-max_total_time=10) ;;
    long) args=(-runs=10000000) ;;
    *) echo "usage: $0 smoke|long" >&2; exit 2 ;;
  esac
  mkdir -p "corpus/$t"
  # -rss_limit_mb: the decoders' memory bound (libFuzzer fails the run past it).
  out=$(cargo +nightly fuzz run "$t" -- "${args[@]}" -rss_limit_mb=2048 -print_final_stats=1 2>&1) || {
    echo "$out" | tail -40
    echo "fuzz target $t FAILED" >&2
    exit 1
  }
  runs=$(echo "$out" | sed -n 's/^stat::number_of_executed_units: *//p')
  secs=$(echo "$out" | sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p')
  cov=$(echo "$out" | grep -o 'cov: [0-9]*' | tail -1)
  peak=$(echo "$out" | sed -n 's/^stat::peak_rss_mb: *//p')
  echo "$t: ${runs} executions in ${secs} s, ${cov}, peak RSS ${peak} MB, no crash"
done
