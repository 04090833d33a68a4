#!/usr/bin/env bash
# Serving latency on MovieLens-100K: starts `cascade serve` (all-in-one, CPU)
# on the newest artifact under artifacts/ (training one first if there is
# none), then drives it with `cascade bench` open-loop load on the same
# machine: Predict at several offered rates, Rank with 200 candidates, and a
# Predict run with 20% unknown users. Writes bench/results/serve-ml100k.json
# (or $OUT: runs, machine, commit, server flags, server RSS) and prints the table.
#   RATES="250,500,1000" DURATION=20 bench/serve-ml100k.sh
# Run it on an otherwise idle machine; the generator shares its cores.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
cargo build --release -q -p cascade
BIN=target/release/cascade
RATES=${RATES:-250,500,1000,1500}
DURATION=${DURATION:-20}
PORT=${PORT:-50151}
SERVE_FLAGS=${SERVE_FLAGS:-}
work=$(mktemp -d)
"$BIN" serve --train-if-missing --artifact artifacts --listen "127.0.0.1:$PORT" \
  --event-log "$work/events.log" $SERVE_FLAGS 2>"$work/serve.log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
wait_serving "$work/serve.log" "$server"
common=(--endpoint "http://127.0.0.1:$PORT" --artifact artifacts --duration "$DURATION" --warmup 3)
"$BIN" bench "${common[@]}" --rpc predict --rate "$RATES" --json "$work/predict.json"
"$BIN" bench "${common[@]}" --rpc rank --rank-items 200 --rate 500,1000 --json "$work/rank.json"
"$BIN" bench "${common[@]}" --rpc predict --cold-share 0.2 --rate 500 --json "$work/cold.json"
rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$server/status")
kill -TERM $server
wait $server || true
python3 - "$work" "$rss_kb" "$SERVE_FLAGS" "${OUT:-bench/results/serve-ml100k.json}" <<'PY'
import json, os, sys
sys.path.insert(0, "bench")
from machine import commit, machine
work, rss_kb, flags, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
runs = []
for name in ("predict", "rank", "cold"):
    for r in json.load(open(os.path.join(work, name + ".json"))):
        r["label"] = {"predict": "predict", "rank": "rank 200 items", "cold": "predict, 20% unknown users"}[name]
        runs.append(r)
res = {
    "command": "bench/serve-ml100k.sh",
    "machine": machine("server and load generator share the same cores"),
    "commit": commit(),
    "serve_flags": flags,
    "server_peak_rss_mib": round(rss_kb / 1024, 1),
    "runs": runs,
}
json.dump(res, open(out, "w"), indent=1)
print(f"server peak RSS {res['server_peak_rss_mib']} MiB; written {out}")
PY
