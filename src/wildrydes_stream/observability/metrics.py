"""Prometheus metrics of one service instance, on a registry of its own.

Names follow Prometheus conventions (base units, `_total` counters, help on every metric);
labels are bounded: shard ids, API names and fixed reasons, never record keys.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from wildrydes_stream import __version__

NAMESPACE = "wildrydes"

# A `_created` twin of every counter and histogram doubles the series for nothing Prometheus
# uses (it reads resets from the counter itself).
disable_created_metrics()  # type: ignore[no-untyped-call]

# Label values known in advance: their series are exported at 0 from the start, so the first
# increment is seen by increase() and rate() instead of being the series' first sample.
DEAD_LETTER_KINDS = ("invalid_record", "rejected_by_table", "retries", "record_age")
DATA_APIS = ("GetRecords", "GetShardIterator", "BatchWriteItem")
BLOCKED_CAUSES = ("permission", "credentials", "missing", "other")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@functools.cache
def revision() -> str:
    """The git revision this code is: WILDRYDES_REVISION (the image sets it at build time),
    else the commit of the checkout the package runs from (an editable install), else
    `unknown`."""
    if os.environ.get("WILDRYDES_REVISION"):
        return os.environ["WILDRYDES_REVISION"]
    source = Path(__file__).resolve().parent
    if not any((parent / ".git").exists() for parent in source.parents):
        return "unknown"  # an installed wheel: no checkout to ask
    try:
        result = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else "unknown"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # process_* series: resident memory against the pod's limit, CPU, open files.
        ProcessCollector(registry=r)
        self.build_info = Gauge(
            "build_info",
            "Always 1: the version, git revision and Python of this process, as labels.",
            ["version", "revision", "python"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.build_info.labels(__version__, revision(), platform.python_version()).set(1)
        self.behind_latest = Gauge(
            "shard_behind_latest_seconds",
            "How far the last GetRecords response (or SubscribeToShard event) of a shard was "
            "behind the tip of the stream (Kinesis MillisBehindLatest).",
            ["shard"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.records_read = Counter(
            "records_read_total",
            "Records read from Kinesis (a KPL aggregate counts its user records).",
            ["shard"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.memory_waits = Counter(
            "reader_memory_waits_total",
            "Times a shard reader waited for room under max_buffered_bytes before reading "
            "more: what was read is not written (or put) as fast as it arrives.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.kpl_aggregates = Counter(
            "kpl_aggregates_total",
            "KPL aggregated records split into their user records.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.kpl_outside_shard = Counter(
            "kpl_records_outside_shard_total",
            "User records of KPL aggregates whose hash key lies outside the shard's range "
            "(packed with an outdated shard map): handled here all the same.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.records_written = Counter(
            "records_written_total",
            "Records durably written to the DynamoDB table.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.records_dead_lettered = Counter(
            "records_dead_lettered_total",
            "Records sent to the dead-letter destination.",
            ["reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.batch_write_seconds = Histogram(
            "batch_write_duration_seconds",
            "Duration of BatchWriteItem calls.",
            ["outcome"],
            namespace=NAMESPACE,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.unprocessed_retried = Counter(
            "unprocessed_items_retried_total",
            "Items DynamoDB returned in UnprocessedItems and that were sent again.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.write_concurrency_limit = Gauge(
            "write_concurrency_limit",
            "BatchWriteItem calls the writers may have in flight: halved on throttling, raised "
            "by one per window of successful calls, at most the number of writers.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.blocked = Gauge(
            "blocked",
            "1 while calls to an API keep failing for a reason that needs an operator "
            "(permissions, credentials, a missing resource); they are retried meanwhile.",
            ["api"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.blocked_errors = Counter(
            "blocked_errors_total",
            "Calls that failed for a reason that needs an operator, by API and cause.",
            ["api", "cause"],
            namespace=NAMESPACE,
            registry=r,
        )
        for api in ("BatchWriteItem", "GetRecords", "GetShardIterator"):
            self.blocked.labels(api).set(0)
            for cause in BLOCKED_CAUSES:
                self.blocked_errors.labels(api, cause)
        self.subscriptions = Counter(
            "fanout_subscriptions_total",
            "SubscribeToShard subscriptions opened (read_mode fanout), by why: `start` (a shard "
            "taken), `renewal` (the last one ran its course, about 5 minutes), `retry` (it "
            "failed: reset, stalled, refused).",
            ["reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        for reason in ("start", "renewal", "retry"):
            self.subscriptions.labels(reason)
        self.throttles = Counter(
            "throttles_total",
            "Calls AWS answered with a throttling error.",
            ["api"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.errors = Counter(
            "aws_errors_total",
            "Calls that failed with an error other than throttling.",
            ["api"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.queue_depth = Gauge(
            "queue_records",
            "Records waiting between the pollers and the writers.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.queue_capacity = Gauge(
            "queue_capacity_records",
            "Configured bound of the queue between pollers and writers.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.shards_owned = Gauge(
            "shards_owned",
            "Shards this process holds the lease of and is reading.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "end_to_end_latency_seconds",
            "Time from the arrival in Kinesis of the oldest record of a write to that write being "
            "acknowledged (one observation per successful BatchWriteItem).",
            namespace=NAMESPACE,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.checkpoints = Counter(
            "checkpoints_total",
            "Checkpoints written to the lease table.",
            ["shard"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "checkpoint_failures_total",
            "Checkpoints that failed for a reason other than a lost lease (each is tried again "
            "at the next round; SHARD_END until it succeeds).",
            ["shard"],
            namespace=NAMESPACE,
            registry=r,
        )
        # Dead-letter destinations
        self.deadletter_failures = Counter(
            "deadletter_failures_total",
            "Failed attempts to store dead letters in a destination (each is retried until it "
            "works; the records wait meanwhile).",
            ["destination"],
            namespace=NAMESPACE,
            registry=r,
        )
        for destination in ("file", "sqs", "s3"):  # exported at 0 from the start
            self.deadletter_failures.labels(destination)
        self._export_known_labels()

    def _export_known_labels(self) -> None:
        for kind in DEAD_LETTER_KINDS:
            self.records_dead_lettered.labels(kind)
        for api in DATA_APIS:
            self.throttles.labels(api)
            self.errors.labels(api)
        for outcome in ("ok", "error"):
            self.batch_write_seconds.labels(outcome)

    def for_stream_output(self, api: str) -> None:
        """For an application that puts on a stream with `api` and writes no table
        (`aggregate`): its /metrics carries none of the table writers' series, and `api` where
        they had BatchWriteItem (exported at 0 from the start, as those were)."""
        for metric in (
            self.records_written,
            self.batch_write_seconds,
            self.unprocessed_retried,
            self.write_concurrency_limit,
            self.end_to_end_seconds,
        ):
            self.registry.unregister(metric)
        self.records_dead_lettered.remove("rejected_by_table")
        for family in (self.throttles, self.errors, self.blocked):
            family.remove("BatchWriteItem")
            family.labels(api)
        for cause in BLOCKED_CAUSES:
            self.blocked_errors.remove("BatchWriteItem", cause)
            self.blocked_errors.labels(api, cause)
        self.blocked.labels(api).set(0)

    def snapshot(self) -> Snapshot:
        """Totals across labels, for summaries and tests."""
        return Snapshot(
            read=_total(self.records_read),
            written=_total(self.records_written),
            dead_lettered=_total(self.records_dead_lettered),
            queued=_value(self.queue_depth),
            max_behind_seconds=max(
                (s.value for f in self.behind_latest.collect() for s in f.samples), default=0.0
            ),
        )

    def watch_checkpoint_age(self, ages: Callable[[], Iterable[tuple[str, float]]]) -> None:
        """Expose seconds since each owned shard's last checkpoint, computed at scrape time."""
        self.registry.register(_CheckpointAge(ages))


@dataclass(frozen=True, slots=True)
class Snapshot:
    read: float
    written: float
    dead_lettered: float
    queued: float
    max_behind_seconds: float

    @property
    def finished(self) -> float:
        return self.written + self.dead_lettered


def _total(metric: Counter) -> float:
    return sum(s.value for f in metric.collect() for s in f.samples if s.name.endswith("_total"))


def _value(metric: Gauge) -> float:
    return sum(s.value for f in metric.collect() for s in f.samples)


class _CheckpointAge(Collector):
    def __init__(self, ages: Callable[[], Iterable[tuple[str, float]]]) -> None:
        self._ages = ages

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            f"{NAMESPACE}_checkpoint_age_seconds",
            "Seconds the shard's stored checkpoint has been behind the records read from it "
            "(0 while it covers everything read: a quiet shard is not stale).",
            labels=["shard"],
        )
        now = time.monotonic()
        for shard, since in self._ages():
            family.add_metric([shard], now - since)
        yield family
