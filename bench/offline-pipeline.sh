#!/usr/bin/env bash
# Times `cascade train` on MovieLens-100K (fetch excluded): MiniLM item
# embeddings with a fresh cache, the ranking protocol (evaluation and model
# selection) and, beside it, the refit of the shipped models on all
# interactions, HNSW build, artifact write. RATING=1 adds the 90/10 rating
# protocol (`--rating-eval`; `cascade eval` always runs it). Writes
# bench/results/offline-ml100k.json (wall time, peak RSS, per-model training
# time, refit time and epochs, quality metrics, machine) and prints a summary.
# Run it on an otherwise idle machine. BIN=target/debug/cascade times the
# debug build instead (its dependencies, Candle included, are optimised).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p cascade
  BIN=target/release/cascade
fi
"$BIN" fetch movielens-100k --out data/ml-100k >/dev/null
"$BIN" fetch minilm --out data/minilm >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
/usr/bin/time -v -o "$work/time.txt" "$BIN" train --quiet --data data/ml-100k --minilm data/minilm \
  --cache "$work/cache" --artifacts "$work/artifacts" --report "$work/report.json" \
  ${RATING:+--rating-eval} 2>&1 | tee "$work/train.txt"
python3 - "$work" bench/results/offline-ml100k.json <<'PY'
import json, os, platform, re, subprocess, sys
work, out = sys.argv[1], sys.argv[2]
t = open(os.path.join(work, "time.txt")).read()
wall = t.split("Elapsed (wall clock) time (h:mm:ss or m:ss):")[1].split()[0].split(":")
wall_s = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
train = open(os.path.join(work, "train.txt")).read()
embed_s = float(re.search(r"text embeddings: .* in ([0-9.]+)s", train).group(1))
r = json.load(open(os.path.join(work, "report.json")))
art = os.path.join(work, "artifacts")
manifest = json.load(open(os.path.join(art, sorted(os.listdir(art))[-1], "manifest.json")))
served = manifest["metrics"]["served_models"]
phases = [{"model": c["model"], "split": "ranking", "epochs": len(c["train_loss"]), "seconds": round(c["seconds"], 1)} for c in r["ranking"]["curves"]]
rating = r.get("rating")
phases += [{"model": c["model"], "split": "rating", "epochs": len(c["train_loss"]), "seconds": round(c["seconds"], 1)} for c in (rating or {}).get("curves", [])]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
mem_gib = round(int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 2**20, 1)
res = {
    "command": "bench/offline-pipeline.sh",
    "machine": {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": mem_gib, "gpu": None},
    "commit": subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip(),
    "wall_seconds": wall_s,
    "peak_rss_mib": round(rss_kb / 1024, 1),
    "text_embedding_seconds": embed_s,
    "training": phases,
    "refit": {"seconds": round(r["refit_seconds"], 1)} | served,
    "binary": os.environ.get("BIN", "target/release/cascade"),
    "rayon_num_threads": os.environ.get("RAYON_NUM_THREADS", "unset (cascade train uses half the cores per lane)"),
    "metrics": {k: r["ranking"][k] for k in ("popularity", "bpr", "two_tower", "cascade")} | {"cascade_weights": r["ranking"]["cascade_weights"]} | ({"rmse": rating["rmse"], "mae": rating["mae"]} if rating else {}),
}
json.dump(res, open(out, "w"), indent=2)
print(f"\nwall {wall_s:.1f}s, peak RSS {res['peak_rss_mib']} MiB, MiniLM {embed_s}s -> {out}")
for p in phases:
    print(f"  {p['model']:<10} {p['split']:<8} {p['epochs']:>3} epochs {p['seconds']:>6.1f}s")
print(f"  refit on all {served['interactions']} interactions: two-tower {served['two_tower_epochs']} + ranker {served['ranker_epochs']} epochs {r['refit_seconds']:.1f}s")
PY
