"""Metrics of the low-magic alerts, on the consumer's registry.

`wildrydes_unicorn_min_magic_points` has a series per unicorn, a label the conventions keep
bounded: at most `alert_max_unicorns_tracked` series, and a unicorn's series goes when this
process stops reading its shard (a stale low value left behind by a shard that moved to
another replica would keep the WildrydesUnicornMagicLow alert firing). Its values are kept in
a plain dict and read at scrape time: setting a labelled Gauge for every record took a lock
and a lookup per record on the hot path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric

from wildrydes_stream.alerts.destinations import NAMES
from wildrydes_stream.observability.metrics import NAMESPACE

log = logging.getLogger(__name__)


class AlertMetrics:
    def __init__(
        self, registry: CollectorRegistry, destinations: Iterable[str], max_unicorns: int
    ) -> None:
        self.alerts = Counter(
            "alerts_total",
            "Low-magic alerts delivered, by state (firing, resolved) and destination.",
            ["state", "destination"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.failures = Counter(
            "alert_delivery_failures_total",
            "Failed attempts to deliver a low-magic alert, by destination (each is retried "
            "until it works; the record's checkpoint waits meanwhile).",
            ["destination"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.refused = Counter(
            "alerts_refused_total",
            "Low-magic alerts a destination refused for themselves (a webhook's 4xx other than "
            "401, 403, 404, 408, 429 and the like; SNS InvalidParameter), by destination: not "
            "retried, the record is dead-lettered as alert_refused.",
            ["destination"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.queued = Gauge(
            "alert_queue_alerts",
            "Low-magic alerts waiting for delivery.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self._magic = _MagicPoints()
        registry.register(self._magic)
        for destination in destinations:  # exported at 0 from the start
            assert destination in NAMES, destination
            self.failures.labels(destination)
            self.refused.labels(destination)
            for state in ("firing", "resolved"):
                self.alerts.labels(state, destination)
        self._max_unicorns = max_unicorns
        self._capped = False

    def saw(self, shard_id: str, unicorn: str, magic: float) -> None:
        """The latest MinMagicPoints of a unicorn, read on a shard."""
        latest = self._magic.latest
        if unicorn in latest or len(latest) < self._max_unicorns:
            latest[unicorn] = (shard_id, magic)
            return
        if not self._capped:
            self._capped = True
            log.warning(
                "more than alert_max_unicorns_tracked (%d) unicorns: no "
                "wildrydes_unicorn_min_magic_points series for the others (their alerts "
                "still fire); raise WILDRYDES_ALERT_MAX_UNICORNS_TRACKED to see them",
                self._max_unicorns,
            )

    def forget_shard(self, shard_id: str) -> None:
        """This process no longer reads the shard: drop the series of its unicorns."""
        latest = self._magic.latest
        for unicorn in [u for u, (shard, _) in latest.items() if shard == shard_id]:
            del latest[unicorn]


class _MagicPoints:
    """`wildrydes_unicorn_min_magic_points`, from the latest value seen per unicorn."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[str, float]] = {}
        """Unicorn -> (the shard its value was last read on, the value)."""

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for unicorn, (_, magic) in list(self.latest.items()):
            family.add_metric([unicorn], magic)
        yield family

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            f"{NAMESPACE}_unicorn_min_magic_points",
            "MinMagicPoints of the latest aggregate read for a unicorn (one series per unicorn, "
            "at most alert_max_unicorns_tracked).",
            labels=["unicorn"],
        )
