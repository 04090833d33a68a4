#!/usr/bin/env python3
"""Do two running `cascade serve` endpoints give the same answers?

Sends the same Predict (every user listed in the artifact's features.json, or
the first --users of them, plus a few unknown users) to both endpoints over
gRPC and compares item IDs, order and every score. Used to check that a
serving change (a build, a flag) leaves what users get untouched.

  pip install grpcio grpcio-tools
  bench/compare-answers.py --a 127.0.0.1:50611 --b 127.0.0.1:50612 \\
      --artifact artifacts/<version> [--k 10] [--users 943] [--tolerance 0]

Exits 1 and prints the first differences when any answer differs by more
than --tolerance (absolute, per score; 0 = bit-identical f32).
"""
import argparse
import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stubs():
    out = tempfile.mkdtemp()
    rc = protoc.main(["protoc", f"-I{ROOT}/proto", f"--python_out={out}", f"--grpc_python_out={out}",
                      f"{ROOT}/proto/cascade/v1/cascade.proto"])
    if rc != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out)
    from cascade.v1 import cascade_pb2, cascade_pb2_grpc
    return cascade_pb2, cascade_pb2_grpc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--artifact", required=True, help="one version directory")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--users", type=int, default=0, help="first N users (0: all)")
    ap.add_argument("--tolerance", type=float, default=0.0)
    args = ap.parse_args()
    pb, rpc = stubs()
    users = json.load(open(os.path.join(args.artifact, "features.json")))["user_ids"]
    if args.users:
        users = users[: args.users]
    users = users + [f"compare-unknown-{i}" for i in range(5)]
    a = rpc.CascadeStub(grpc.insecure_channel(args.a))
    b = rpc.CascadeStub(grpc.insecure_channel(args.b))
    diffs, worst = [], 0.0
    for u in users:
        req = pb.PredictRequest(user_id=u, num_results=args.k)
        ra, rb = a.Predict(req, timeout=30), b.Predict(req, timeout=30)
        ia = [it.item_id for it in ra.items]
        ib = [it.item_id for it in rb.items]
        if ia != ib:
            diffs.append(f"{u}: items {ia} vs {ib}")
            continue
        for x, y in zip(ra.items, rb.items):
            for f in ("score", "retrieval_score", "predicted_rating"):
                if x.HasField(f) if f != "score" else True:
                    d = abs(getattr(x, f) - getattr(y, f))
                    worst = max(worst, d)
                    if d > args.tolerance:
                        diffs.append(f"{u}: {x.item_id} {f} {getattr(x, f)} vs {getattr(y, f)}")
    print(f"{len(users)} users, top-{args.k}: {len(diffs)} differing answers; "
          f"largest score difference {worst:.3g}")
    for d in diffs[:10]:
        print("  " + d)
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
