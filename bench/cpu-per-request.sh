#!/usr/bin/env bash
# Server CPU per Predict: starts `cascade serve` (all-in-one, CPU) on an
# artifact, then for each offered rate runs `cascade bench` open-loop and
# reads the server's CPU time (utime + stime from /proc/PID/stat) before and
# after. Prints and writes (bench/results/cpu-per-request.json, or $OUT) the
# server's CPU ms per answered request, its cores busy, the generator's own
# cores, and the latency percentiles.
#   BIN=target/release/cascade ARTIFACT=artifacts RATES=200,500 DURATION=20 bench/cpu-per-request.sh
# BIN defaults to the release build (built if missing). Compare two builds
# with the same ARTIFACT back to back: ratios from one sitting are what the
# shared, noisy machines support.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p cascade
  BIN=target/release/cascade
fi
ARTIFACT=${ARTIFACT:-artifacts}
RATES=${RATES:-200,500}
DURATION=${DURATION:-20}
PORT=${PORT:-50161}
SERVE_FLAGS=${SERVE_FLAGS:-}
work=$(mktemp -d)
"$BIN" serve --artifact "$ARTIFACT" --listen "127.0.0.1:$PORT" --metrics-addr off \
  --event-log "$work/events.log" $SERVE_FLAGS 2>"$work/serve.log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
wait_serving "$work/serve.log" "$server"
ticks() { awk '{print $14 + $15}' "/proc/$server/stat"; }
hz=$(getconf CLK_TCK)
IFS=, read -ra rates <<<"$RATES"
for rate in "${rates[@]}"; do
  # Warm-up outside the measured window (the server's CPU is read around
  # the measured run only).
  "$BIN" bench --endpoint "http://127.0.0.1:$PORT" --artifact "$ARTIFACT" --rpc predict \
    --rate "$rate" --duration 3 --warmup 0 >/dev/null
  t0=$(ticks); s0=$(date +%s.%N)
  "$BIN" bench --endpoint "http://127.0.0.1:$PORT" --artifact "$ARTIFACT" --rpc predict \
    --rate "$rate" --duration "$DURATION" --warmup 0 --json "$work/run-$rate.json" >/dev/null
  t1=$(ticks); s1=$(date +%s.%N)
  echo "$rate $((t1 - t0)) $s0 $s1" >>"$work/cpu.txt"
done
kill -TERM $server
wait $server || true
python3 - "$work" "$hz" "$BIN" "$ARTIFACT" "$SERVE_FLAGS" "${OUT:-bench/results/cpu-per-request.json}" <<'PY'
import json, os, sys
sys.path.insert(0, "bench")
from machine import commit, machine
work, hz, binary, artifact, flags, out = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
rows = []
for line in open(os.path.join(work, "cpu.txt")):
    rate, ticks, s0, s1 = line.split()
    run = json.load(open(os.path.join(work, f"run-{rate}.json")))[0]
    cpu_s = int(ticks) / hz
    wall = float(s1) - float(s0)
    rows.append({
        "offered_rps": float(rate), "achieved_rps": run["achieved_rps"], "ok": run["ok"],
        "errors": run["errors"],
        "server_cpu_ms_per_request": round(1e3 * cpu_s / max(run["ok"], 1), 3),
        "server_cores_busy": round(cpu_s / wall, 3),
        "generator_cores": round(run["generator_cpu_cores"], 3),
        "p50_ms": run["latency_ms"]["p50"], "p99_ms": run["latency_ms"]["p99"],
    })
res = {"command": "bench/cpu-per-request.sh", "binary": binary, "artifact": artifact,
       "serve_flags": flags, "machine": machine("server and load generator share the same cores"),
       "commit": commit(), "runs": rows}
json.dump(res, open(out, "w"), indent=1)
print(f"{'rps':>6} {'achieved':>9} {'srv cpu ms/req':>15} {'srv cores':>10} {'gen cores':>10} {'p50 ms':>8} {'p99 ms':>8}")
for r in rows:
    print(f"{r['offered_rps']:>6.0f} {r['achieved_rps']:>9.1f} {r['server_cpu_ms_per_request']:>15.3f} "
          f"{r['server_cores_busy']:>10.3f} {r['generator_cores']:>10.3f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}")
print(f"written {out}")
PY
