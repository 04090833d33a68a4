#!/usr/bin/env bash
# The split deployment on MovieLens-100K: `--role retrieval`, `--role ranker`
# and `--role gateway` as three processes on this machine, against the same
# artifact, driven by `cascade bench` Predict at a few open-loop rates; then
# `--role all` alone at the same rates for comparison, in the same run.
# Writes bench/results/serve-split-ml100k.json and prints both tables.
#   RATES=250,500,1000 DURATION=20 bench/serve-split-ml100k.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p cascade
BIN=target/release/cascade
RATES=${RATES:-250,500,1000}
DURATION=${DURATION:-20}
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
ART=$(ls -d artifacts/*/ | sort | tail -1)
start() { # name port args...
  local name=$1 port=$2; shift 2
  "$BIN" serve --artifact "$ART" --listen "127.0.0.1:$port" --metrics-addr 127.0.0.1:0 --event-log "$work/$name.events" "$@" \
    2>"$work/$name.log" &
  pids+=($!)
  until grep -q "serving cascade.v1" "$work/$name.log"; do sleep 0.2; done
}
start retrieval 50161 --role retrieval
start ranker 50162 --role ranker
start gateway 50160 --role gateway --retrieval-endpoint http://127.0.0.1:50161 \
  --ranker-endpoint http://127.0.0.1:50162
"$BIN" bench --endpoint http://127.0.0.1:50160 --artifact "$ART" --rpc predict --rate "$RATES" \
  --duration "$DURATION" --warmup 3 --json "$work/split.json"
kill -TERM "${pids[@]}"; wait "${pids[@]}" || true; pids=()
start all 50163 --role all
"$BIN" bench --endpoint http://127.0.0.1:50163 --artifact "$ART" --rpc predict --rate "$RATES" \
  --duration "$DURATION" --warmup 3 --json "$work/all.json"
kill -TERM "${pids[@]}"; wait "${pids[@]}" || true; pids=()
python3 - "$work" bench/results/serve-split-ml100k.json <<'PY'
import json, os, platform, subprocess, sys
work, out = sys.argv[1], sys.argv[2]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
res = {
    "command": "bench/serve-split-ml100k.sh",
    "machine": {"cpus": os.cpu_count(), "cpu": cpu, "gpu": None,
                "note": "gateway, retrieval, ranker and the load generator share the same cores"},
    "commit": subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip(),
    "split": json.load(open(os.path.join(work, "split.json"))),
    "all": json.load(open(os.path.join(work, "all.json"))),
}
json.dump(res, open(out, "w"), indent=1)
for name in ("split", "all"):
    for r in res[name]:
        print(f"{name:6} {r['offered_rps']:7.0f} rps: achieved {r['achieved_rps']:7.1f}  p50 {r['latency_ms']['p50']:.2f} ms  p99 {r['latency_ms']['p99']:.2f} ms  errors {r['errors'] or 'none'}")
print("written", out)
PY
