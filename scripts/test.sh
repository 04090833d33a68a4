#!/usr/bin/env bash
# The project's test command (README, CI). Fetches the pinned MiniLM weights
# the encoder parity test needs (nothing fetched is committed), runs every
# cargo test, validates the Helm chart and EKS config against the server
# (scripts/check-chart.py), then the end-to-end run on MovieLens-100K
# (tests/e2e-movielens.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${CARGO_JOBS:-2}
cargo build -q -p cascade -j "$jobs"
# The binary cargo just built (CARGO_TARGET_DIR moves it).
export CASCADE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/cascade"
"$CASCADE_BIN" fetch minilm --out data/minilm
CASCADE_MINILM="$PWD/data/minilm" cargo test --workspace -j "$jobs" "$@"
python3 -m pip install -q -r scripts/requirements-deploy.txt
python3 scripts/check-chart.py "$CASCADE_BIN"
tests/e2e-movielens.sh
