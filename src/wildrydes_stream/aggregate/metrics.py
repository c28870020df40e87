"""Metrics of the aggregation stage, on the consumer's registry (readings read are the core's
`wildrydes_records_read_total`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from wildrydes_stream.observability.metrics import NAMESPACE, Metrics

LATE_OUTCOMES = ("merged", "dead_lettered")


class AggregateMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.windows_open = Gauge(
            "aggregate_windows_open",
            "Windows holding readings not yet put on the output stream.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.window_bytes = Gauge(
            "aggregate_window_bytes",
            "Bytes of windows not yet put (open, or waiting for PutRecords, with their queued "
            "records), counted against max_buffered_bytes.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.buffered_bytes = Gauge(
            "aggregate_buffered_bytes",
            "Bytes counted against max_buffered_bytes: record pages being read and windows not "
            "yet put. Pollers read no more while it is at the bound.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.windows_emitted = Counter(
            "aggregate_windows_emitted_total",
            "Window aggregates handed to the output stream writer (re-emissions included).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.windows_reemitted = Counter(
            "aggregate_windows_reemitted_total",
            "Windows put again after an earlier put: a late reading, the idle timeout followed "
            "by more readings, or a restart replaying readings past the checkpoint.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.late_readings = Counter(
            "aggregate_late_readings_total",
            "Readings whose window the watermark had already passed: merged (the window is put "
            "again) or dead-lettered (more than late_horizon_seconds behind).",
            ["outcome"],
            namespace=NAMESPACE,
            registry=r,
        )
        for outcome in LATE_OUTCOMES:
            self.late_readings.labels(outcome)
        self.duplicate_readings = Counter(
            "aggregate_duplicate_readings_total",
            "Readings with the Name and StatusTime of one already in their window (a producer's "
            "retry, or a replay after a restart): counted once.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.records_put = Counter(
            "aggregate_records_put_total",
            "Window records acknowledged by PutRecords on the output stream.",
            namespace=NAMESPACE,
            registry=r,
        )
        metrics.records_dead_lettered.labels("late")
        self._registry = r

    def watch_watermarks(self, watermarks: Callable[[], Iterable[tuple[str, float]]]) -> None:
        """Expose how far each owned shard's watermark (epoch seconds) trails now, at scrape
        time."""
        self._registry.register(_WatermarkDelay(watermarks))


class _WatermarkDelay(Collector):
    def __init__(self, watermarks: Callable[[], Iterable[tuple[str, float]]]) -> None:
        self._watermarks = watermarks

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            f"{NAMESPACE}_aggregate_watermark_delay_seconds",
            "How far the shard's watermark (its furthest unicorn's latest StatusTime minus "
            "allowed_lateness_seconds) trails this process's clock: about how long after a "
            "window ends it is put. 0 while the readings' StatusTime runs ahead of the clock "
            "(a simulated fleet, as `local --speed` runs, or a producer clock that is fast).",
            labels=["shard"],
        )
        now = time.time()
        for shard, watermark in self._watermarks():
            # Event time ahead of the clock is no delay: a negative value would read as one.
            family.add_metric([shard], max(0.0, now - watermark))
        yield family
