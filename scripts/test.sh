#!/usr/bin/env bash
# The project's test command (README, CI). Fetches the pinned MiniLM weights
# the encoder parity test needs (nothing fetched is committed), runs every
# cargo test, then the end-to-end run on MovieLens-100K (tests/e2e-movielens.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${CARGO_JOBS:-2}
cargo build -q -p cascade -j "$jobs"
./target/debug/cascade fetch minilm --out data/minilm
CASCADE_MINILM="$PWD/data/minilm" cargo test --workspace -j "$jobs" "$@"
tests/e2e-movielens.sh
