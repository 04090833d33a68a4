#!/usr/bin/env python3
"""Offline validation of the deployment side (run by scripts/test.sh).

Renders charts/cascade in both modes and with value variations, lints it
(strict), validates every manifest against the Kubernetes 1.31 schemas
(unknown kinds fail unless allow-listed), checks that bad values are refused
by values.schema.json, validates eks/cluster.yaml against eks/cluster.schema.json,
and checks that what the manifests say about the server -- flags and their
environment variables, ports, the readiness service name, metric names -- is
what the server really has: its `cascade serve --help` and its source.

usage: scripts/check-chart.py [path/to/cascade binary]   (default target/debug/cascade)
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml
from helm_python import chart as hc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "charts", "cascade")
KUBE = "1.31.0"
# CRDs with no schema in kubernetes-validate; validated against their CRD
# schemas by scripts/crd-validate (npm) instead.
ALLOWED_UNKNOWN = {"ServiceMonitor", "ScaledObject"}

failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg)


def server_facts(binary):
    help_text = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    flags = set(re.findall(r"--([a-z][a-z0-9-]+)", help_text))
    envs = set(re.findall(r"\[env: ([A-Z0-9_]+)=", help_text))
    lib = open(os.path.join(ROOT, "crates/cascade-server/src/lib.rs")).read()
    readiness = re.search(r'pub const READINESS_SERVICE: &str = "([^"]+)"', lib).group(1)
    sources = "".join(
        open(os.path.join(ROOT, p)).read()
        for p in ("crates/cascade-server/src/telemetry/metrics.rs", "crates/cascade-core/src/metrics.rs")
    )
    metrics = set(re.findall(r'"((?:cascade|grpc)_[a-z_]+)"', sources))
    disc = open(os.path.join(ROOT, "crates/cascade-server/src/discovery.rs")).read()
    port_name = re.search(r'pub const STAGE_PORT_NAME: &str = "([^"]+)"', disc).group(1)
    discovery = set(re.search(r"--discovery <DISCOVERY>.*?\[possible values: ([^\]]+)\]", help_text, re.S).group(1).split(", "))
    return flags, envs, readiness, metrics, port_name, discovery


def render(values, name="rec", namespace="prod"):
    c = hc.Chart.load(CHART)
    out = c.render(values, name=name, namespace=namespace, is_install=True)
    docs = []
    for path, text in out.items():
        if not path.endswith(".yaml"):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                docs.append((path, d))
    return docs


CRD_DIR = os.path.join(ROOT, "scripts", "crd-validate")


def validate_crds(files, label):
    """ServiceMonitor and ScaledObject against their CRD schemas (npm packages)."""
    if not files:
        return
    if not os.path.isdir(os.path.join(CRD_DIR, "node_modules")):
        subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=CRD_DIR, check=True)
    r = subprocess.run(["node", os.path.join(CRD_DIR, "validate.mjs"), *files], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"{label}: CRD objects invalid:\n{r.stdout}{r.stderr}")


def validate(docs, label):
    crd_files = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (path, d) in enumerate(docs):
            f = os.path.join(tmp, f"{n:03d}-{d['kind']}.yaml")
            with open(f, "w") as fh:
                yaml.safe_dump(d, fh)
            r = subprocess.run(
                [sys.executable, "-m", "kubernetes_validate", "-k", KUBE, "--strict", f], capture_output=True, text=True
            )
            text = r.stdout + r.stderr
            if "Couldn't find schema" in text or "could not find schema" in text.lower():
                if d["kind"] not in ALLOWED_UNKNOWN:
                    fail(f"{label}: no schema for kind {d['kind']} ({path})")
                crd_files.append(f)
                continue
            if r.returncode != 0:
                fail(f"{label}: {d['kind']} {d['metadata']['name']} ({path}) invalid:\n{text}")
        validate_crds(crd_files, label)


def arg(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def check_discovery(docs, label, facts):
    """The split gateway's pod discovery: what it watches exists, and it may watch it."""
    port_name, modes = facts[4], facts[5]
    gw = next((d for _, d in docs if d["kind"] == "Deployment" and "gateway" in d["spec"]["template"]["spec"]["containers"][0]["args"]), None)
    if gw is None:
        return
    pod = gw["spec"]["template"]["spec"]
    ctr = pod["containers"][0]
    mode = arg(ctr["args"], "--discovery")
    if mode not in modes:
        fail(f"{label}: gateway --discovery {mode!r} is not one of the server's {sorted(modes)}")
    services = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "Service"}
    for flag in ("--retrieval-endpoint", "--ranker-endpoint"):
        host = re.match(r"http://([^:/]+):(\d+)$", arg(ctr["args"], flag) or "")
        svc = services.get(host.group(1)) if host else None
        if svc is None:
            fail(f"{label}: {flag} {arg(ctr['args'], flag)} names no rendered Service")
            continue
        if not any(p["name"] == port_name and str(p["port"]) == host.group(2) for p in svc["spec"]["ports"]):
            fail(f"{label}: Service {svc['metadata']['name']} has no port {port_name!r} on {host.group(2)}")
    roles = [d for _, d in docs if d["kind"] == "Role"]
    bindings = [d for _, d in docs if d["kind"] == "RoleBinding"]
    if mode != "kube":
        if roles or bindings:
            fail(f"{label}: RBAC rendered although the gateway does not watch the API")
        return
    if not any(e.get("name") == "POD_NAMESPACE" and e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace" for e in ctr.get("env", [])):
        fail(f"{label}: the kube gateway is not told its namespace (POD_NAMESPACE)")
    can_watch = {
        r["metadata"]["name"]
        for r in roles
        for rule in r["rules"]
        if "discovery.k8s.io" in rule["apiGroups"] and "endpointslices" in rule["resources"] and {"list", "watch"} <= set(rule["verbs"])
    }
    sa = pod["serviceAccountName"]
    if not any(
        b["roleRef"]["kind"] == "Role" and b["roleRef"]["name"] in can_watch and any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in b["subjects"])
        for b in bindings
    ):
        fail(f"{label}: the gateway's ServiceAccount {sa} may not list/watch endpointslices")


def check_against_server(docs, label, facts):
    flags, envs, readiness, metrics = facts[:4]
    check_discovery(docs, label, facts)
    cms = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "ConfigMap"}
    for _, d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config"):
            for k in d["data"]:
                if k.startswith("CASCADE_") and k not in envs:
                    fail(f"{label}: ConfigMap sets {k}, which `cascade serve` does not read")
        if d["kind"] == "Deployment":
            pod = d["spec"]["template"]["spec"]
            for ctr in pod["containers"]:
                if ctr["name"] != "cascade":
                    continue
                args = ctr["args"]
                if args[0] != "serve":
                    fail(f"{label}: container does not run `cascade serve`: {args}")
                for a in args:
                    if a.startswith("--") and a[2:] not in flags:
                        fail(f"{label}: flag {a} is not a `cascade serve` flag")
                ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
                cm = cms[ctr["envFrom"][0]["configMapRef"]["name"]]
                if cm["data"]["CASCADE_LISTEN"].rsplit(":", 1)[1] != str(ports["grpc"]):
                    fail(f"{label}: grpc port {ports['grpc']} is not the listen port")
                if cm["data"]["CASCADE_METRICS_ADDR"].rsplit(":", 1)[1] != str(ports["metrics"]):
                    fail(f"{label}: metrics port {ports['metrics']} is not --metrics-addr")
                if ctr["readinessProbe"]["grpc"]["service"] != readiness:
                    fail(f"{label}: readiness probes {ctr['readinessProbe']['grpc']['service']!r}, server reports {readiness!r}")
                for probe in ("startupProbe", "livenessProbe"):
                    if ctr[probe]["grpc"]["service"] != "":
                        fail(f"{label}: {probe} must ask for the overall health ('')")
                    if ctr[probe]["grpc"]["port"] != ports["grpc"]:
                        fail(f"{label}: {probe} on the wrong port")
                grace = pod["terminationGracePeriodSeconds"]
                pre = ctr["lifecycle"]["preStop"]["sleep"]["seconds"]
                if grace <= pre:
                    fail(f"{label}: terminationGracePeriodSeconds {grace} leaves no time to drain after preStop {pre}")
                sc = ctr["securityContext"]
                if not (sc.get("readOnlyRootFilesystem") and sc.get("capabilities", {}).get("drop") == ["ALL"]):
                    fail(f"{label}: container security context not locked down")
        if d["kind"] == "HorizontalPodAutoscaler":
            for m in d["spec"]["metrics"]:
                if m["type"] == "Pods" and m["pods"]["metric"]["name"] not in metrics:
                    fail(f"{label}: HPA scales on {m['pods']['metric']['name']}, which the server does not export")
        if d["kind"] == "ScaledObject":
            for t in d["spec"]["triggers"]:
                name = re.match(r"sum\(([a-z_]+)\{", t["metadata"]["query"]).group(1)
                if name not in metrics:
                    fail(f"{label}: KEDA query uses {name}, which the server does not export")
        if d["kind"] == "Service":
            names = {p["name"] for p in d["spec"]["ports"]}
            if names != {"grpc", "metrics"}:
                fail(f"{label}: service ports {names}")
    for k in ("listen", "metrics-addr"):
        if k not in flags:
            fail(f"`cascade serve` has no --{k}")


def kinds(docs):
    out = {}
    for _, d in docs:
        out.setdefault(d["kind"], []).append(d["metadata"]["name"])
    return out


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/debug/cascade")
    facts = server_facts(binary)
    variants = {
        "all-in-one (defaults)": {},
        "split, GPU ranker, pods metric": {"mode": "split"},
        "split, CPU ranker, KEDA, DNS discovery": {
            "mode": "split",
            "discovery": "dns",
            "ranker": {"gpu": {"enabled": False}, "autoscaling": {"type": "keda"}},
        },
        "split, PVC artifacts, no HPA": {
            "mode": "split",
            "artifacts": {"source": "pvc", "pvc": {"claimName": "cascade-artifacts"}},
            "gateway": {"autoscaling": {"enabled": False}},
            "retrieval": {"autoscaling": {"enabled": False}},
            "ranker": {"autoscaling": {"enabled": False}, "pdb": {"enabled": False}},
        },
        "all-in-one, baked image, tracing, monitoring, network policy": {
            "artifacts": {"source": "image"},
            "otel": {"endpoint": "http://otel-collector.observability:4317", "headers": "x-api-key=secret"},
            "serviceMonitor": {"enabled": True},
            "networkPolicy": {"enabled": True},
            "config": {"workers": 8},
        },
    }
    seen_kinds = set()
    for label, values in variants.items():
        lint = hc.lint(CHART, values, strict=True, kube_version="v" + KUBE)
        if lint["errors"] or any(m["severity"] > 1 for m in lint["messages"]):
            fail(f"{label}: helm lint: {lint}")
        docs = render(values)
        seen_kinds |= {d["kind"] for _, d in docs}
        validate(docs, label)
        check_against_server(docs, label, facts)
        print(f"ok: {label}: {json.dumps(kinds(docs))}")
        # Variant-specific expectations.
        k = kinds(docs)
        if values.get("mode") == "split":
            if sorted(k["Deployment"]) != ["rec-cascade", "rec-cascade-ranker", "rec-cascade-retrieval"]:
                fail(f"{label}: deployments {k['Deployment']}")
            headless = [d["metadata"]["name"] for _, d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
            if sorted(headless) != ["rec-cascade-ranker", "rec-cascade-retrieval"]:
                fail(f"{label}: headless services {headless}")
    must = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "Secret",
            "ServiceAccount", "NetworkPolicy", "ServiceMonitor", "ScaledObject", "Pod", "Role", "RoleBinding"}
    if not must <= seen_kinds:
        fail(f"kinds never rendered: {must - seen_kinds}")

    # GPU scheduling only when asked for.
    gpu = render({"mode": "split"})
    cpu = render({"mode": "split", "ranker": {"gpu": {"enabled": False}}})
    def ranker(docs):
        return next(d for _, d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-ranker"))
    g, c = ranker(gpu)["spec"]["template"]["spec"], ranker(cpu)["spec"]["template"]["spec"]
    if g["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") != "1" or "--device" not in g["containers"][0]["args"]:
        fail("GPU ranker lacks its GPU limit or --device cuda")
    if not any(t.get("key") == "nvidia.com/gpu" for t in g.get("tolerations", [])):
        fail("GPU ranker does not tolerate the GPU taint")
    if "nvidia.com/gpu" in c["containers"][0]["resources"].get("limits", {}) or c.get("tolerations") or c.get("nodeSelector"):
        fail("CPU ranker still asks for GPU nodes")

    # The schema refuses what is not a value of this chart.
    for label, bad in {
        "unknown top-level key": {"replicas": 3},
        "unknown nested key": {"ranker": {"gpu": {"enabled": True, "count": 1, "vendor": "amd"}}},
        "bad mode": {"mode": "both"},
        "bad artifact URI": {"artifacts": {"s3": {"uri": "https://bucket"}}},
        "bad sampler": {"otel": {"sampler": "sometimes"}},
        "bad discovery": {"discovery": "consul"},
    }.items():
        try:
            render(bad)
            fail(f"schema accepted {label}: {bad}")
        except Exception as e:  # the SDK raises on schema violations
            print(f"ok: schema refuses {label} ({str(e).splitlines()[0][:100]})")

    # eksctl ClusterConfig against the schema written for the fields it uses.
    r = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", os.path.join(ROOT, "eks/cluster.schema.json"), os.path.join(ROOT, "eks/cluster.yaml")],
        capture_output=True, text=True,
    )
    if r.returncode != 0:
        fail(f"eks/cluster.yaml: {r.stdout}{r.stderr}")
    else:
        print("ok: eks/cluster.yaml matches eks/cluster.schema.json")
    cluster = yaml.safe_load(open(os.path.join(ROOT, "eks/cluster.yaml")))
    groups = {g["name"]: g for g in cluster["managedNodeGroups"]}
    gpu_group = next((g for g in groups.values() if any(t["key"] == "nvidia.com/gpu" for t in g.get("taints", []))), None)
    values = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))
    if gpu_group is None:
        fail("eks/cluster.yaml has no GPU node group tainted nvidia.com/gpu")
    else:
        for k, v in values["ranker"]["gpu"]["nodeSelector"].items():
            if gpu_group.get("labels", {}).get(k) != v:
                fail(f"the chart's GPU nodeSelector {k}={v} does not match the GPU node group's labels")
    adapter = yaml.safe_load(open(os.path.join(ROOT, "eks/prometheus-adapter-values.yaml")))
    series = [r["seriesQuery"] for r in adapter["rules"]["custom"]]
    if not any(values["ranker"]["autoscaling"]["metric"] in s for s in series):
        fail("prometheus-adapter has no rule for the ranker's HPA metric")
    for s in series:
        name = re.match(r"([a-z_]+)\{", s).group(1)
        if name not in facts[3]:
            fail(f"prometheus-adapter rule on {name}, which the server does not export")

    if failures:
        print(f"\n{len(failures)} failure(s)")
        sys.exit(1)
    print("deployment checks passed")


if __name__ == "__main__":
    main()
