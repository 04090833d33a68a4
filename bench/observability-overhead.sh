#!/usr/bin/env bash
# What observability costs: Predict throughput of two `cascade serve`
# processes on the same ML-100K artifact, started side by side and loaded in
# turn (A B A B ...), so both see the same machine state:
#   A  observability off: --metrics-addr off, no OTLP endpoint
#   B  metrics on (scraped every second while loaded) and tracing configured
#      with sampling off (OTEL_TRACES_SAMPLER=always_off): every RPC still
#      extracts trace context, starts a non-recording span and updates its
#      series; no span is exported.
#   C  as B with every trace sampled: all spans (server + six stages) are
#      recorded and queued; the OTLP target is a closed port, so the export
#      attempts fail off the request path (an upper bound on the recording
#      cost, not a measurement of a collector's).
# Each turn is a closed-loop `cascade bench` run at saturating concurrency;
# the result is B/A per round and its median. Writes
# bench/results/observability-overhead.json (or $OUT) and prints the table.
#   ROUNDS=3 DURATION=10 CONCURRENCY=32 bench/observability-overhead.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p cascade
BIN=target/release/cascade
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONCURRENCY=${CONCURRENCY:-32}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
start() { # name port env... -- flags...
  local name=$1 port=$2; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  env "${envs[@]}" "$BIN" serve --artifact artifacts --listen "127.0.0.1:$port" \
    --event-log "$work/$name.events" "$@" 2>"$work/$name.log" &
  pids+=($!)
  for _ in $(seq 1 300); do
    grep -q "serving cascade.v1" "$work/$name.log" && return 0
    sleep 1
  done
  cat "$work/$name.log"; exit 1
}
start off 50161 -- --metrics-addr off
start on 50162 OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 OTEL_TRACES_SAMPLER=always_off -- \
  --metrics-addr 127.0.0.1:9562
start all 50163 OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 OTEL_TRACES_SAMPLER=always_on -- \
  --metrics-addr 127.0.0.1:9563
grep -q "exporting traces" "$work/on.log" || { echo "tracing did not turn on"; exit 1; }
bench() { # name port round
  "$BIN" bench --endpoint "http://127.0.0.1:$2" --artifact artifacts --rpc predict \
    --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup 2 \
    --json "$work/$1-$3.json" 2>/dev/null >/dev/null
}
for r in $(seq 1 "$ROUNDS"); do
  bench off 50161 "$r"
  ( while true; do curl -s -o /dev/null 127.0.0.1:9562/metrics; sleep 1; done ) &
  scraper=$!
  bench on 50162 "$r"
  kill $scraper
  bench all 50163 "$r"
done
curl -s 127.0.0.1:9562/metrics >"$work/scrape.txt"
python3 - "$work" "$ROUNDS" "$CONCURRENCY" "${OUT:-bench/results/observability-overhead.json}" <<'PY'
import json, os, statistics, sys
sys.path.insert(0, "bench")
from machine import commit, machine
work, rounds, conc, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rows = []
for r in range(1, rounds + 1):
    a = json.load(open(os.path.join(work, f"off-{r}.json")))[0]
    b = json.load(open(os.path.join(work, f"on-{r}.json")))[0]
    c = json.load(open(os.path.join(work, f"all-{r}.json")))[0]
    rows.append({"round": r, "off_rps": a["achieved_rps"], "on_rps": b["achieved_rps"],
                 "sampled_rps": c["achieved_rps"], "sampled_p99_ms": c["latency_ms"]["p99"],
                 "sampled_ratio": c["achieved_rps"] / a["achieved_rps"],
                 "off_p99_ms": a["latency_ms"]["p99"], "on_p99_ms": b["latency_ms"]["p99"],
                 "off_errors": a["errors"], "on_errors": b["errors"],
                 "ratio": b["achieved_rps"] / a["achieved_rps"]})
scraped = sum(1 for l in open(os.path.join(work, "scrape.txt")) if l and not l.startswith("#"))
res = {
    "command": "bench/observability-overhead.sh",
    "commit": commit(),
    "machine": machine("server and load generator share the same cores"),
    "concurrency": conc,
    "rounds": rows,
    "median_ratio": statistics.median(r["ratio"] for r in rows),
    "median_sampled_ratio": statistics.median(r["sampled_ratio"] for r in rows),
    "series_in_scrape": scraped,
}
json.dump(res, open(out, "w"), indent=2)
print(f"{'round':>5} {'A off':>7} {'B on':>7} {'B/A':>6} {'C sampled':>9} {'C/A':>6} {'A p99':>7} {'B p99':>7} {'C p99':>7}")
for r in rows:
    print(f"{r['round']:>5} {r['off_rps']:>7.0f} {r['on_rps']:>7.0f} {r['ratio']:>6.3f} {r['sampled_rps']:>9.0f} {r['sampled_ratio']:>6.3f}"
          f" {r['off_p99_ms']:>7.2f} {r['on_p99_ms']:>7.2f} {r['sampled_p99_ms']:>7.2f}")
print(f"median B/A throughput ratio: {res['median_ratio']:.3f} ({(1 - res['median_ratio']) * 100:.1f}% cost)")
print(f"median C/A throughput ratio: {res['median_sampled_ratio']:.3f}")
PY
