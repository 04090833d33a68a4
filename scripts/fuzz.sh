#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz, libFuzzer with AddressSanitizer) of
# the HNSW dump walk that guards hnsw_rs's loader (tests/fuzz). By hand:
#   SECONDS_PER_TARGET=600 scripts/fuzz.sh
# Needs the nightly toolchain (cargo fuzz's sanitizer flags); installs
# cargo-fuzz if missing. Crashes land in tests/fuzz/artifacts/. Leak
# detection is off: `ItemIndex::load` leaks its small hnsw_rs reloader on
# purpose (the loaded graph borrows it for 'static).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
corpus=tests/fuzz/corpus/hnsw_dump
mkdir -p "$corpus"
CASCADE_FUZZ_SEED="$PWD/$corpus/seed-60-items" \
  cargo test -q -p cascade-retrieval --lib write_fuzz_seed -- --ignored >/dev/null
ASAN_OPTIONS=detect_leaks=0 cargo +nightly fuzz run --fuzz-dir tests/fuzz hnsw_dump "$corpus" -- \
  -max_total_time="${SECONDS_PER_TARGET:-300}" -rss_limit_mb=4096 -print_final_stats=1 \
  -detect_leaks=0
