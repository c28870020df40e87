"""The metric families each application registers, as documentation tables.

`wildrydes-stream metrics --format markdown` prints them; docs/operating.md carries the output
between `<!-- metrics:... -->` markers (scripts/regen-docs.py rewrites them, and
tests/test_docs.py fails when they differ). The registries are built the way the applications
build theirs at start (the consumer core's Metrics, then what `run`'s alert stage or
`aggregate`'s windows add), without any AWS call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from wildrydes_stream.observability.metrics import NAMESPACE, Metrics

APPLICATIONS = ("run", "aggregate")
# The label values that name a series per shard or unicorn are not listed: they are data.
_OPEN_LABELS = frozenset({"shard", "unicorn", "version", "revision", "python"})


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    """As queried: a counter's name ends in `_total`."""
    type: str
    labels: tuple[str, ...]
    values: dict[str, tuple[str, ...]]
    """Per label, the values exported from the start (at 0), when the label has fixed ones."""
    help: str
    only: dict[str, str] | None = None
    """Label values only one application exports, and which (in the `core` section)."""


def registry_of(app: str) -> CollectorRegistry:
    """A registry holding every metric family `app` registers once started."""
    metrics = Metrics()
    metrics.watch_checkpoint_age(lambda: ())
    if app == "run":
        from wildrydes_stream.alerts.destinations import NAMES
        from wildrydes_stream.alerts.metrics import AlertMetrics

        AlertMetrics(metrics.registry, NAMES, 1)
    elif app == "aggregate":
        from wildrydes_stream.aggregate.metrics import AggregateMetrics
        from wildrydes_stream.sink.kinesis import API as PUT_API

        metrics.for_stream_output(PUT_API)
        AggregateMetrics(metrics).watch_watermarks(lambda: ())
    else:
        raise ValueError(f"no application {app!r}: one of {', '.join(APPLICATIONS)}")
    return metrics.registry


def families(app: str) -> list[Family]:
    """The service's own families (`wildrydes_*`) of `app`, by name."""
    registry = registry_of(app)
    found: dict[str, Family] = {}
    # The registry keeps its collectors privately; the labels of a family with no series yet
    # are known only to the metric object (or the family a custom collector yields).
    for collector in list(registry._collector_to_names):
        labelled: Iterable[tuple[object, tuple[str, ...]]]
        if isinstance(collector, MetricWrapperBase):
            labelled = [(m, tuple(collector._labelnames)) for m in collector.collect()]
        else:
            labelled = [(m, tuple(getattr(m, "_labelnames", ()))) for m in collector.collect()]
        for metric, labels in labelled:
            name = getattr(metric, "name", "")
            if not name.startswith(f"{NAMESPACE}_"):
                continue  # process_* from prometheus_client
            kind = getattr(metric, "type", "")
            shown = f"{name}_total" if kind == "counter" else name
            values = {
                label: tuple(
                    dict.fromkeys(
                        s.labels[label] for s in getattr(metric, "samples", []) if label in s.labels
                    )
                )
                for label in labels
                if label not in _OPEN_LABELS
            }
            found[shown] = Family(
                shown,
                kind,
                labels,
                {k: v for k, v in values.items() if v},
                getattr(metric, "documentation", ""),
            )
    return [found[name] for name in sorted(found)]


def sections() -> dict[str, list[Family]]:
    """The families of both applications (`core`), of `run` only and of `aggregate` only.
    A family in both lists the label values either exports from the start, a value only one
    of them exports followed by its name."""
    run = {f.name: f for f in families("run")}
    aggregate = {f.name: f for f in families("aggregate")}
    core = []
    for name in sorted(run.keys() & aggregate.keys()):
        one, other = run[name], aggregate[name]
        values, only = {}, {}
        for label in one.labels:
            mine, theirs = one.values.get(label, ()), other.values.get(label, ())
            values[label] = tuple(dict.fromkeys((*mine, *theirs)))
            only.update({v: "run" for v in mine if v not in theirs})
            only.update({v: "aggregate" for v in theirs if v not in mine})
        kept = {k: v for k, v in values.items() if v}
        core.append(Family(name, one.type, one.labels, kept, one.help, only))
    return {
        "core": core,
        "run": [run[name] for name in sorted(run.keys() - aggregate.keys())],
        "aggregate": [aggregate[name] for name in sorted(aggregate.keys() - run.keys())],
    }


TITLES = {
    "core": "Both applications (the consumer core)",
    "run": "`run` only (the table writers and the low-magic alerts)",
    "aggregate": "`aggregate` only (the windows and PutRecords)",
}


def render_metrics(fmt: str, section: str | None = None) -> str:
    """The tables of `sections()` (or one of them) as markdown, or as plain text."""
    chosen = sections()
    if section is not None:
        chosen = {section: chosen[section]}
    if fmt == "markdown":
        blocks = []
        for name, rows in chosen.items():
            lines = [] if section else [f"{TITLES[name]}:", ""]
            lines += ["| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
            for family in rows:
                meaning = family.help.replace("|", "\\|")
                lines.append(f"| `{family.name}` | {family.type} | {_labels(family)} | {meaning} |")
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)
    lines = []
    for name, rows in chosen.items():
        lines.append(f"# {TITLES[name]}")
        for family in rows:
            lines.append(f"{family.name} ({family.type}) {', '.join(family.labels)}")
            lines.append(f"    {family.help}")
    return "\n".join(lines)


def _labels(family: Family) -> str:
    shown = []
    for label in family.labels:
        values = family.values.get(label)
        text = f"`{label}`"
        if values:
            only = family.only or {}
            text += ": " + ", ".join(
                f"`{v}` ({only[v]})" if v in only else f"`{v}`" for v in values
            )
        shown.append(text)
    return "; ".join(shown)
