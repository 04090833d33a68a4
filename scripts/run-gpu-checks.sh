#!/usr/bin/env bash
# Every GPU check and timing, from an unpacked CUDA bundle on a GPU host
# (scripts/build-cuda.sh makes the bundle; this script ships inside it).
# Builds nothing. Writes results/ (or $OUT): JSON per step, server logs, SVG
# plots, and SUMMARY.txt. Steps:
#   1. libraries resolve (ldd), the GPU is visible (nvidia-smi)
#   2. cascade gpu-check: ranker + MiniLM-shaped encoder CUDA vs CPU (rel err
#      < 1e-4), ranker forward per batch size 1..65536 on CUDA and CPU
#   3. fallback: --device cuda:99 falls back to CPU with a clear log line
#   4. serve --device cuda: Rank (200 items) and Predict sweeps until p99 > 18 ms
#   5. dynamic batching: Rank at a fixed rate with --batch-max-delay-us 0 / 500,
#      and with batching off (--batch-max-rows 1)
#   6. the same Rank and Predict sweeps with the CPU ranker on this host
set -uo pipefail
cd "$(dirname "$0")"
B=$PWD/bin/cascade
A=$PWD/artifact
R=${OUT:-$PWD/results}
mkdir -p "$R"
DUR=${DURATION:-10}
say() { echo "== $*" | tee -a "$R/SUMMARY.txt"; }

# 1. CUDA user-space libraries: the host's nvidia (cu13) wheels, unless given.
if [ -z "${CASCADE_CUDA_LIB:-}" ]; then
  CASCADE_CUDA_LIB=$(python3 -c "import nvidia,os; print([os.path.join(p,'cu13','lib') for p in nvidia.__path__ if os.path.isdir(os.path.join(p,'cu13','lib'))][0])" 2>/dev/null || true)
fi
export LD_LIBRARY_PATH=${CASCADE_CUDA_LIB:-}:${LD_LIBRARY_PATH:-}
say "libraries from ${CASCADE_CUDA_LIB:-<system>}"
ldd "$B" > "$R/ldd.txt" 2>&1
if grep -q "not found" "$R/ldd.txt"; then
  say "MISSING LIBRARIES:"; grep "not found" "$R/ldd.txt" | tee -a "$R/SUMMARY.txt"; exit 1
fi
nvidia-smi > "$R/nvidia-smi.txt" 2>&1 || say "nvidia-smi failed"
head -15 "$R/nvidia-smi.txt" >> "$R/SUMMARY.txt"

# 2. Agreement and forward throughput.
say "gpu-check"
"$B" gpu-check --artifact "$A" --device cuda --with-cpu --json "$R/gpu-check.json" 2>"$R/gpu-check.log" \
  | tee -a "$R/SUMMARY.txt"
say "gpu-check exit ${PIPESTATUS[0]}"

# 3. Fallback when CUDA is unusable.
"$B" predict --artifact "$A" --device cuda:99 --user 196 -k 3 >"$R/fallback.txt" 2>&1
if grep -q "falling back to CPU" "$R/fallback.txt"; then say "fallback: ok (cuda:99 -> cpu, logged)"; else say "fallback: NO LOG LINE"; fi

serve() { # device port extra-flags...
  local dev=$1 port=$2; shift 2
  "$B" serve --artifact "$A" --device "$dev" --listen "127.0.0.1:$port" \
    --metrics-addr 127.0.0.1:0 --event-log "$R/events-$port.log" "$@" 2>"$R/serve-$dev-$port.log" &
  SERVER=$!
  LOG=$R/serve-$dev-$port.log
  for _ in $(seq 1 120); do
    grep -q "serving cascade.v1" "$R/serve-$dev-$port.log" && break
    kill -0 $SERVER 2>/dev/null || { say "server on $dev failed:"; tail -5 "$R/serve-$dev-$port.log"; return 1; }
    sleep 1
  done
  grep -m1 "loaded and warmed" "$R/serve-$dev-$port.log" | tee -a "$R/SUMMARY.txt"
  if [ "$dev" = cuda ] && ! grep -q "on cuda:" "$R/serve-$dev-$port.log"; then
    say "WARNING: --device cuda fell back to CPU; these numbers are CPU numbers"
  fi
}
stop() {
  kill -TERM "$SERVER"; wait "$SERVER"; say "server exit $?"
  grep -m1 "ranking batches" "$LOG" | tee -a "$R/SUMMARY.txt"  # batch-size histogram
}
bench() { # port name args...
  local port=$1 name=$2; shift 2
  "$B" bench --endpoint "http://127.0.0.1:$port" --artifact "$A" --duration "$DUR" --warmup 2 \
    --json "$R/$name.json" --plot "$R/$name.svg" "$@" 2>>"$R/bench.log" | tee -a "$R/SUMMARY.txt"
}

for dev in cuda cpu; do
  # 4 / 6. Sweeps to the rate where p99 passes 18 ms.
  say "serve --device $dev: sweeps"
  serve $dev 50300 || continue
  bench 50300 "$dev-rank-sweep" --rpc rank --rank-items 200 --sweep --rate 500 --sweep-factor 1.5 --connections 8
  bench 50300 "$dev-predict-sweep" --rpc predict --sweep --rate 500 --sweep-factor 1.5 --connections 8
  stop
  # 5. Dynamic batching on and off at a fixed rate.
  for flags in "--batch-max-delay-us 0" "--batch-max-delay-us 500" "--batch-max-rows 1"; do
    say "serve --device $dev $flags: Rank 200 items at ${BATCH_RATE:-4000} rps"
    # shellcheck disable=SC2086
    serve $dev 50301 $flags || continue
    bench 50301 "$dev-batching-$(echo $flags | tr ' ' '_' | tr -d '-')" --rpc rank --rank-items 200 \
      --rate "${BATCH_RATE:-4000}" --connections 8
    stop
  done
done
say "done; results in $R"
