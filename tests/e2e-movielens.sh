#!/usr/bin/env bash
# End to end on the real data: fetch MovieLens-100K and MiniLM (pinned), train
# with the defaults, verify the artifact, and check the quality bar the project
# promises: the full cascade clearly beats popularity, and the rating head is
# in the range of classic SVD. Run by scripts/test.sh; takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CASCADE_BIN:-./target/debug/cascade}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$BIN" fetch movielens-100k --out data/ml-100k
"$BIN" fetch minilm --out data/minilm
"$BIN" train --quiet --data data/ml-100k --minilm data/minilm \
  --artifacts "$work/artifacts" --report "$work/report.json" | tee "$work/train.txt"
"$BIN" verify --artifact "$work/artifacts"

python3 - "$work/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rk, rt = r["ranking"], r["rating"]
pop, tt, cas = rk["popularity"], rk["two_tower"], rk["cascade"]
fails = []
if r["num_interactions"] != 100000 or r["num_users"] != 943 or r["num_items"] != 1682:
    fails.append("dataset is not MovieLens-100K")
if not cas["recall_at_10"] > 1.5 * pop["recall_at_10"]:
    fails.append(f"cascade Recall@10 {cas['recall_at_10']:.4f} not clearly above popularity {pop['recall_at_10']:.4f}")
if not cas["ndcg_at_10"] > 1.5 * pop["ndcg_at_10"]:
    fails.append(f"cascade NDCG@10 {cas['ndcg_at_10']:.4f} not clearly above popularity {pop['ndcg_at_10']:.4f}")
if not tt["recall_at_10"] > 0.2:
    fails.append(f"two-tower Recall@10 {tt['recall_at_10']:.4f} below 0.2")
if not rt["rmse"] < 0.96:
    fails.append(f"ranker RMSE {rt['rmse']:.4f} not below 0.96")
if fails:
    sys.exit("e2e quality check failed:\n  " + "\n  ".join(fails))
print(f"e2e ok: cascade R@10 {cas['recall_at_10']:.4f} vs popularity {pop['recall_at_10']:.4f}; RMSE {rt['rmse']:.4f}")
PY
