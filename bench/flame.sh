#!/usr/bin/env bash
# A flame graph of `cascade serve` (all-in-one, CPU) under open-loop Predict
# load from `cascade bench`: perf samples the server's threads (call graphs)
# while the generator runs, inferno folds and draws them.
#   BIN=target/release/cascade ARTIFACT=<version dir> RATE=1000 SECS=15 OUT=bench/flame-predict.svg bench/flame.sh
# Needs `perf` (apt linux-perf) and inferno (`cargo install inferno`).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BIN=${BIN:-target/release/cascade}
ARTIFACT=${ARTIFACT:-artifacts}
RATE=${RATE:-1000}
SECS=${SECS:-15}
OUT=${OUT:-bench/flame-predict.svg}
PORT=${PORT:-50171}
work=$(mktemp -d)
"$BIN" serve --artifact "$ARTIFACT" --listen "127.0.0.1:$PORT" --metrics-addr off \
  --event-log "$work/events.log" ${SERVE_FLAGS:-} 2>"$work/serve.log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
wait_serving "$work/serve.log" "$server"
"$BIN" bench --endpoint "http://127.0.0.1:$PORT" --artifact "$ARTIFACT" --rpc predict \
  --rate "$RATE" --duration "$((SECS + 6))" --warmup 2 >"$work/bench.txt" &
gen=$!
sleep 4
perf record -F 999 -g -p "$server" -o "$work/perf.data" -- sleep "$SECS" 2>/dev/null
wait $gen
perf script -i "$work/perf.data" 2>/dev/null | inferno-collapse-perf | \
  inferno-flamegraph --title "cascade serve, Predict at $RATE rps ($(basename "$BIN"))" >"$OUT"
tail -3 "$work/bench.txt"
echo "written $OUT"
