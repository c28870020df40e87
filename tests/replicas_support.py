"""Several service processes on one stream, as tests/consumer/test_replicas.py and
bench/replicas.py run them: replicas started as child processes under their own worker ids,
what each reports on /metrics, a producer of records with distinct keys, and duplicate item
writes counted at the DynamoDB endpoint (a FaultProxy's `item_writes`), never from the
service's own metrics.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.process import ServiceProcess
from wildrydes_stream.records.fields import status_time_to_epoch_ms
from wildrydes_stream.runtime.waiting import wait_or_timeout

UNICORNS = 60

Key = tuple[str, str]
"""An item's key as the proxy records it: (Name, StatusTime in epoch ms)."""


def record(n: int) -> dict[str, Any]:
    """The n-th aggregate: one a minute per unicorn, so every key is distinct."""
    minute = n // UNICORNS
    return {
        "Name": f"Unicorn{n % UNICORNS:02d}",
        "StatusTime": f"2016-02-{12 + minute // 1440:02d} "
        f"{minute // 60 % 24:02d}:{minute % 60:02d}:00.000",
        "Distance": 1000 + n % 500,
        "MinMagicPoints": 100,
        "MaxMagicPoints": 150,
        "MinHealthPoints": 120,
        "MaxHealthPoints": 150,
    }


def key_of(aggregate: Mapping[str, Any]) -> Key:
    return (aggregate["Name"], str(status_time_to_epoch_ms(aggregate["StatusTime"])))


def duplicates(writes: Counter[Key]) -> dict[Key, int]:
    """Keys written more than once, and how many times each."""
    return {key: count for key, count in writes.items() if count > 1}


def writes_again(writes: Counter[Key], before: Counter[Key]) -> int:
    """Writes since `before` (the counts as they were earlier) of a key already written."""
    since = writes - before
    return sum(count if before[key] else count - 1 for key, count in since.items())


def metric_sum(families: list[Any], sample: str) -> float:
    return float(sum(s.value for f in families for s in f.samples if s.name == sample))


@dataclass(frozen=True)
class Report:
    """What one replica says on /metrics."""

    owned: float
    """wildrydes_shards_owned: shards it holds the lease of and reads."""
    reading: frozenset[str]
    """Shards it has had a GetRecords answer for in its current tenure (the shards with a
    wildrydes_shard_behind_latest_seconds series: a shard that moves away loses its series)."""
    read: dict[str, float]
    """wildrydes_records_read_total by shard, since the process started."""

    @classmethod
    def parse(cls, text: str) -> Report:
        families = list(text_string_to_metric_families(text))
        reading = frozenset(
            s.labels["shard"]
            for f in families
            for s in f.samples
            if s.name == "wildrydes_shard_behind_latest_seconds"
        )
        read = {
            s.labels["shard"]: s.value
            for f in families
            for s in f.samples
            if s.name == "wildrydes_records_read_total"
        }
        return cls(metric_sum(families, "wildrydes_shards_owned"), reading, read)


Reports = dict[str, Report]


def even(reports: Reports, shards: int) -> bool:
    """Every shard held and read by exactly one replica, the counts at most one apart."""
    counts = [report.owned for report in reports.values()]
    return all_read(reports, shards) and max(counts) - min(counts) <= 1


def all_read(reports: Reports, shards: int) -> bool:
    """Every shard held and read, each by exactly one replica."""
    if not reports:
        return False
    reading = [report.reading for report in reports.values()]
    union = frozenset().union(*reading)
    return (
        sum(report.owned for report in reports.values()) == shards
        and len(union) == shards
        and sum(len(r) for r in reading) == shards
        and all(report.owned == len(report.reading) for report in reports.values())
    )


@dataclass
class Replicas:
    """Service processes with one environment, each under its own worker id (its name)."""

    env: Mapping[str, str]
    running: dict[str, ServiceProcess] = field(default_factory=dict)
    ended: list[ServiceProcess] = field(default_factory=list)

    async def start(self, *names: str, timeout: float = 60.0) -> None:
        """Start these replicas together and wait until each has started (its first look at
        the lease table is done, /readyz says ready)."""

        async def one(name: str) -> None:
            child = await ServiceProcess.start({**self.env, "WILDRYDES_WORKER_ID": name}, "run")
            self.running[name] = child
            await child.started(timeout)

        await asyncio.gather(*(one(name) for name in names))

    async def stop(
        self, name: str, signum: signal.Signals = signal.SIGTERM, timeout: float = 60.0
    ) -> int:
        """Send `signum` to a replica and wait for its exit code; it is no longer running."""
        child = self.running.pop(name)
        self.ended.append(child)
        child.send(signum)
        return await child.wait(timeout)

    async def reports(self) -> Reports:
        """Each running replica's /metrics, read at once."""
        names = list(self.running)
        pages = await asyncio.gather(*(self.running[name].get("/metrics") for name in names))
        reports = {}
        for name, (status, text) in zip(names, pages, strict=True):
            assert status == 200, (name, status, text)
            reports[name] = Report.parse(text)
        return reports

    async def until(
        self, condition: Callable[[Reports], bool], timeout: float, interval: float = 0.05
    ) -> Reports:
        """The reports once `condition` holds for them; TimeoutError (with the last reports and
        what the replicas logged) when it does not within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            reports = await self.reports()
            if condition(reports):
                return reports
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"not within {timeout}s; last reports: {reports}\n{self.describe()}"
                )
            await asyncio.sleep(interval)

    def describe(self) -> str:
        """Each replica's log lines about leases, for a failure message."""
        lines = []
        for name, child in self.running.items():
            for entry in child.logs():
                if "shard" in entry or entry.get("level") in ("WARNING", "ERROR"):
                    lines.append(f"{name}: {json.dumps(entry)}")
        return "\n".join(lines[-200:])

    async def close(self) -> None:
        for child in [*self.running.values(), *self.ended]:
            await child.close()
        self.running.clear()


class Producer:
    """Puts `rate` records a second with distinct keys (ten PutRecords a second) until
    stopped; remembers each record's key and the shard it went to."""

    def __init__(self, kinesis: Any, stream: str, rate: float) -> None:
        self._kinesis = kinesis
        self._stream = stream
        self._per_tick = max(1, round(rate / 10))
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.shard_of: dict[Key, str] = {}
        """Every record put, by key: the shard it is on."""

    @property
    def produced(self) -> int:
        return len(self.shard_of)

    def keys(self) -> set[Key]:
        return set(self.shard_of)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="producer")

    async def stop(self) -> None:
        """Stop putting; raises what made the producer fail, if anything did."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        tick = time.monotonic()
        while not self._stop.is_set():
            await self.put(record(self.produced + i) for i in range(self._per_tick))
            tick += 0.1
            await wait_or_timeout(self._stop, tick - time.monotonic())

    async def put(self, aggregates: Iterable[dict[str, Any]]) -> None:
        batch = list(aggregates)
        entries = [{"Data": json.dumps(r).encode(), "PartitionKey": r["Name"]} for r in batch]
        response = await self._kinesis.put_records(StreamName=self._stream, Records=entries)
        assert response.get("FailedRecordCount", 0) == 0, response
        for aggregate, result in zip(batch, response["Records"], strict=True):
            self.shard_of[key_of(aggregate)] = result["ShardId"]
