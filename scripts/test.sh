#!/usr/bin/env bash
# The project's test command (README, CI). Fetches the pinned MiniLM weights
# the encoder parity test needs (nothing fetched is committed), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p cascade -j "${CARGO_JOBS:-2}"
./target/debug/cascade fetch minilm --out data/minilm
CASCADE_MINILM="$PWD/data/minilm" cargo test --workspace -j "${CARGO_JOBS:-2}" "$@"
