"""Metrics of the low-magic alerts, on the consumer's registry.

`wildrydes_unicorn_min_magic_points` has a series per unicorn, a label the conventions keep
bounded: at most `alert_max_unicorns_tracked` series, and a unicorn's series goes when this
process stops reading its shard (a stale low value left behind by a shard that moved to
another replica would keep the WildrydesUnicornMagicLow alert firing).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

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
        self.queued = Gauge(
            "alert_queue_alerts",
            "Low-magic alerts waiting for delivery.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.magic = Gauge(
            "unicorn_min_magic_points",
            "MinMagicPoints of the latest aggregate read for a unicorn (one series per unicorn, "
            "at most alert_max_unicorns_tracked).",
            ["unicorn"],
            namespace=NAMESPACE,
            registry=registry,
        )
        for destination in destinations:  # exported at 0 from the start
            assert destination in NAMES, destination
            self.failures.labels(destination)
            for state in ("firing", "resolved"):
                self.alerts.labels(state, destination)
        self._max_unicorns = max_unicorns
        self._series: dict[str, tuple[str, Any]] = {}
        """Unicorn -> (the shard its series was last set from, the series): looked up once
        per record, so the labelled child is kept rather than found again each time."""
        self._capped = False

    def saw(self, shard_id: str, unicorn: str, magic: float) -> None:
        """The latest MinMagicPoints of a unicorn, read on a shard."""
        known = self._series.get(unicorn)
        if known is not None and known[0] == shard_id:
            known[1].set(magic)
            return
        if known is None and len(self._series) >= self._max_unicorns:
            if not self._capped:
                self._capped = True
                log.warning(
                    "more than alert_max_unicorns_tracked (%d) unicorns: no "
                    "wildrydes_unicorn_min_magic_points series for the others (their alerts "
                    "still fire); raise WILDRYDES_ALERT_MAX_UNICORNS_TRACKED to see them",
                    self._max_unicorns,
                )
            return
        series = self.magic.labels(unicorn)
        self._series[unicorn] = (shard_id, series)
        series.set(magic)

    def forget_shard(self, shard_id: str) -> None:
        """This process no longer reads the shard: drop the series of its unicorns."""
        gone = [unicorn for unicorn, (shard, _) in self._series.items() if shard == shard_id]
        for unicorn in gone:
            del self._series[unicorn]
            self.magic.remove(unicorn)
