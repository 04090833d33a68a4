#!/usr/bin/env bash
# The 1M-item synthetic catalogue end to end: `cascade synth` (generation,
# HNSW build, recall@100 vs exact, artifact size), `cascade serve` on it
# (start-up time to ready, peak RSS), and `cascade bench` Predict at a few
# open-loop rates. Writes bench/results/synth-1m.json and prints the tables.
#   ITEMS=1000000 RATES=250,500,1000 DURATION=20 bench/synth-1m.sh
# KEEP=DIR keeps the generated artifact root there (e.g. for
# CASCADE_BENCH_ARTIFACT=DIR/<version> cargo bench -p cascade-core --bench micro).
# Run it on an otherwise idle machine; the generator shares the server's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p cascade
BIN=target/release/cascade
ITEMS=${ITEMS:-1000000}
RATES=${RATES:-250,500,1000}
DURATION=${DURATION:-20}
PORT=${PORT:-50152}
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
server=
ART=${KEEP:-$work/artifacts}
/usr/bin/time -v -o "$work/synth-time.txt" "$BIN" synth --items "$ITEMS" --users 10000 \
  --out "$ART" --report "$work/synth.json" | tee "$work/synth.txt"
ART=$(ls -d "$ART"/*/ | sort | tail -1)
t0=$(date +%s.%N)
"$BIN" serve --artifact "$ART" --listen "127.0.0.1:$PORT" --event-log "$work/events.log" \
  2>"$work/serve.log" &
server=$!
until grep -q "serving cascade.v1" "$work/serve.log"; do
  kill -0 $server 2>/dev/null || { cat "$work/serve.log"; exit 1; }
  sleep 0.2
done
ready=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$t0" "$(date +%s.%N)")
rss_ready_kb=$(awk '/VmRSS/ {print $2}' "/proc/$server/status")
"$BIN" bench --endpoint "http://127.0.0.1:$PORT" --artifact "$ART" --rpc predict \
  --rate "$RATES" --duration "$DURATION" --warmup 3 --json "$work/predict.json"
rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$server/status")
kill -TERM $server; wait $server || true
du -sb "$ART" | cut -f1 > "$work/bytes"
python3 - "$work" "$ready" "$rss_ready_kb" "$rss_kb" bench/results/synth-1m.json <<'PY'
import json, os, platform, re, subprocess, sys
work, ready, rss_ready, rss, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
t = open(os.path.join(work, "synth-time.txt")).read()
synth_rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
wall = t.split("Elapsed (wall clock) time (h:mm:ss or m:ss):")[1].split()[0].split(":")
wall_s = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
res = {
    "command": "bench/synth-1m.sh",
    "machine": {"cpus": os.cpu_count(), "cpu": cpu, "gpu": None,
                "note": "server and load generator share the same cores"},
    "commit": subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip(),
    "synth": json.load(open(os.path.join(work, "synth.json"))),
    "synth_wall_seconds": wall_s,
    "synth_peak_rss_mib": round(synth_rss / 1024, 1),
    "artifact_mib": round(int(open(os.path.join(work, "bytes")).read()) / 2**20, 1),
    "server_start_to_ready_seconds": ready,
    "server_rss_at_ready_mib": round(rss_ready / 1024, 1),
    "server_peak_rss_mib": round(rss / 1024, 1),
    "predict": json.load(open(os.path.join(work, "predict.json"))),
}
json.dump(res, open(out, "w"), indent=1)
print(f"start to ready {ready}s; server RSS {res['server_rss_at_ready_mib']} MiB at ready, {res['server_peak_rss_mib']} MiB peak; artifact {res['artifact_mib']} MiB; written {out}")
PY
