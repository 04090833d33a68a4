#!/usr/bin/env bash
# What --batch-max-delay-us does on CPU: for each delay, starts `cascade
# serve` (all-in-one) on the MovieLens-100K artifact under artifacts/
# (training one first if there is none), drives it with `cascade bench`
# open-loop Predict at each rate, then stops it and reads the batcher's
# shutdown summary (forwards, rows and requests per forward). Writes
# bench/results/batch-delay-ml100k.json (or $OUT) and prints one line per run.
#   DELAYS="0 200 1000" RATES="500,1000,1500" DURATION=15 bench/batch-delay-ml100k.sh
# Run it on an otherwise idle machine; the generator shares its cores.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
cargo build --release -q -p cascade
BIN=target/release/cascade
DELAYS=${DELAYS:-0 200 1000}
RATES=${RATES:-500,1000,1500}
DURATION=${DURATION:-15}
PORT=${PORT:-50161}
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
server=
for d in $DELAYS; do
  "$BIN" serve --train-if-missing --artifact artifacts --listen "127.0.0.1:$PORT" \
    --event-log "$work/events-$d.log" --batch-max-delay-us "$d" \
    --rank-threads "${RANK_THREADS:-1}" 2>"$work/serve-$d.log" &
  server=$!
  wait_serving "$work/serve-$d.log" "$server"
  "$BIN" bench --endpoint "http://127.0.0.1:$PORT" --artifact artifacts --duration "$DURATION" \
    --warmup 3 --rpc predict --rate "$RATES" --json "$work/delay-$d.json"
  kill -TERM $server
  wait $server || true
  server=
done
python3 - "$work" "${OUT:-bench/results/batch-delay-ml100k.json}" $DELAYS <<'PY'
import json, os, re, sys
sys.path.insert(0, "bench")
from machine import commit, machine
work, out, delays = sys.argv[1], sys.argv[2], sys.argv[3:]
runs = []
for d in delays:
    log = open(os.path.join(work, f"serve-{d}.log")).read()
    m = re.findall(r"(\d+) forwards, (\d+) rows \(([\d.]+) per forward\); rows per forward ([^;]*); requests per forward ([^\n\"]*)", log)
    if not m:
        sys.exit(f"no batcher summary in the delay {d} server's log")
    forwards, rows, per, rows_hist, jobs_hist = m[-1]
    batch = {"forwards": int(forwards), "rows": int(rows), "rows_per_forward": float(per),
             "rows_per_forward_hist": rows_hist.strip(), "requests_per_forward_hist": jobs_hist.strip()}
    for r in json.load(open(os.path.join(work, f"delay-{d}.json"))):
        runs.append({"batch_max_delay_us": int(d), "server_batching_whole_life": batch, **r})
        l, s = r["latency_ms"], r.get("server_stages_ms", {})
        q = s.get("rank_queue", {}).get("p50", float("nan"))
        print(f"delay {d:>5} us  offered {r['offered_rps']:7.1f}  achieved {r['achieved_rps']:7.1f}  "
              f"p50 {l['p50']:6.2f}  p99 {l['p99']:6.2f} ms  rank queue p50 {q:.3f} ms  "
              f"errors {r['errors'] or 'none'}  (server life: {per} rows/forward)")
res = {
    "command": "bench/batch-delay-ml100k.sh",
    "machine": machine("server and load generator share the same cores"),
    "commit": commit(),
    "runs": runs,
}
json.dump(res, open(out, "w"), indent=1)
print(f"written {out}")
PY
