"""The whole pipeline at a fleet's size, as tests/aggregate/test_pipeline_fleet.py runs it.

`plan()` lays out every raw reading in the order it is put: a thousand unicorns (some with
names nobody expected, one whose clock runs two hours ahead, some whose magic dips below the
threshold and recovers), a reading a second each, with late readings, producers' duplicates
and readings past the horizon placed around a split and a merge of the raw stream's shard.

`expect()` says what those readings must give, from the rules of docs/how-it-works.md alone
("The aggregation stage", "Low-magic alerts"), never from the service's code: each unicorn on its
own clock, a reading more than the horizon behind its unicorn's watermark refused, a
(Name, StatusTime) counted once, one `firing` and one `resolved` alert per dip. The plan keeps
every reading clear of the rules' edges by `MARGIN_MS` of event time (checked as the
expectation is computed), so a replay after kill -9, which may see a unicorn's watermark a
little further on, decides every reading the same way.

`Feed` puts the plan on the stream and reshards where the plan says; `Pipeline` runs the
aggregator replicas and `run` as child processes.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_for
from tests.process import ServiceProcess

T0 = datetime(2017, 6, 5, 9, 17, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WINDOW_MS = 60_000
LATENESS_MS = 10_000
HORIZON_MS = 150_000
THRESHOLD = 50
MARGIN_MS = 20_000
"""How far every reading stays from an edge of the rules, in event time."""

SKEWED = "Clockwork"
"""The unicorn whose clock runs two hours ahead of everyone else's."""
SKEW = timedelta(hours=2)
LONG = "L" * 200 + "ő" * 55 + "!"
HOSTILE = [
    "Silver Blaze",
    "Épona",
    "独角兽",
    "a\r\nb",
    " ",
    '\t"quoted" \\ back',
    "🦄 Sparkle",
    '{"Name":"not me"}',
    LONG,
]
FLEET = [*HOSTILE, SKEWED] + [f"unicorn-{i:04d}" for i in range(1000 - len(HOSTILE) - 1)]
assert len(set(FLEET)) == len(FLEET) == 1000
assert len(LONG) == 256

SPLIT_AT = 80
"""Second (of event time) the parent's readings stop and the children's start."""
MERGE_AT = 140
LAST = 180
"""Seconds 0..LAST-1 come from everyone, then one closing reading at CLOSING."""
CLOSING = 215

# Which minutes each dipping unicorn is low in: below the threshold for half a minute (seconds
# 10..39 of the minute), then back. A dip in minute 1 spans the split, in minute 2 the merge
# and resolves at the closing reading's minute. Each dip sits in one window, its neighbours
# high, so it gives one `firing` and one `resolved` however often its windows are put.
_DIP_SHAPES: list[tuple[int, ...]] = [(0,), (1,), (2,), (0, 2)]
DIPS: dict[str, tuple[int, ...]] = {
    "a\r\nb": (1,),
    LONG: (2,),
    "Épona": (0, 2),
    "独角兽": (0,),
    SKEWED: (1,),
    **{FLEET[20 + 7 * i]: _DIP_SHAPES[i % len(_DIP_SHAPES)] for i in range(36)},
}


MIDDLE = 2**127
"""Where the parent splits."""


@dataclass(frozen=True)
class Planned:
    """A reading to put, and its event time in epoch ms."""

    record: dict[str, Any]
    time_ms: int

    @property
    def name(self) -> str:
        return str(self.record["Name"])


Step = tuple[Literal["put"], int, int] | tuple[Literal["split", "merge", "gate"]]


@dataclass
class Plan:
    readings: list[Planned] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    late: set[int] = field(default_factory=set)
    """Indices of readings put after their minute's window was due (a re-put)."""
    duplicates: set[int] = field(default_factory=set)
    past_horizon: set[int] = field(default_factory=set)
    """Indices of readings planned more than the horizon behind (refused)."""

    def put(self, readings: Sequence[Planned], kind: set[int] | None = None) -> None:
        start = len(self.readings)
        self.readings.extend(readings)
        if kind is not None:
            kind.update(range(start, len(self.readings)))
        if self.steps and self.steps[-1][0] == "put":
            self.steps[-1] = ("put", self.steps[-1][1], len(self.readings))
        else:
            self.steps.append(("put", start, len(self.readings)))

    def reshard(self, step: Literal["split", "merge"]) -> None:
        self.steps.append((step,))

    def gate(self) -> None:
        """The feed stops here until the test lets it go on (see Feed.reached)."""
        self.steps.append(("gate",))


class _Readings:
    """The fleet's readings, one per unicorn and second; `again` makes a new reading of an
    earlier second (a late one: another StatusTime in the same second)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.at: dict[tuple[str, int], Planned] = {}
        self._seconds: dict[tuple[timedelta, int], tuple[str, int]] = {}

    def second(self, second: int) -> list[Planned]:
        names = list(FLEET)
        self.rng.shuffle(names)
        out = [self._make(name, second, self.rng.randint(0, 499)) for name in names]
        for planned in out:
            self.at[planned.name, second] = planned
        return out

    def again(self, name: str, second: int) -> Planned:
        """A reading of `second` that was not put with it (late): magic never low."""
        return self._make(name, second, self.rng.randint(500, 999), low=False)

    def closing(self, name: str) -> Planned:
        return self._make(name, CLOSING, self.rng.randint(0, 999))

    def _make(self, name: str, second: int, ms: int, low: bool | None = None) -> Planned:
        draw = self.rng.random
        skew = SKEW if name == SKEWED else timedelta(0)
        at = self._second_at(skew, second)
        minute, into = divmod(second, 60)
        dipping = minute in DIPS.get(name, ()) and 10 <= into < 40
        if dipping if low is None else low:
            magic = 20 + int(draw() * 30)  # 20..49
        else:
            magic = 50 + int(draw() * 151)  # 50..200: at the threshold is not low
        # Distances as the workshop's producers send them: whole metres or floats.
        digits = int(draw() * 3)
        distance = int(draw() * 41) if digits == 0 else round(draw() * 40, digits)
        record = {
            "Distance": distance,
            "HealthPoints": 20 + int(draw() * 181),
            "Latitude": 40.749,
            "Longitude": -73.985,
            "MagicPoints": magic,
            "Name": name,
            "StatusTime": f"{at[0]}.{ms:03d}",
        }
        return Planned(record, at[1] + ms)

    def _second_at(self, skew: timedelta, second: int) -> tuple[str, int]:
        """StatusTime of a whole second (without its milliseconds), and its epoch ms."""
        key = (skew, second)
        known = self._seconds.get(key)
        if known is None:
            at = T0 + skew + timedelta(seconds=second)
            known = self._seconds[key] = (
                f"{at:%Y-%m-%d %H:%M:%S}",
                (at - EPOCH) // timedelta(milliseconds=1),
            )
        return known


def plan(seed: int = 2017) -> Plan:
    """Every reading in put order, and where the shard splits and the children merge."""
    fleet = _Readings(seed)
    rng = random.Random(seed + 1)
    p = Plan()

    def some(count: int) -> list[str]:
        return rng.sample(FLEET, count)

    def earlier(first: int, last: int, count: int) -> list[Planned]:
        """Readings already put (of seconds first..last), put again: duplicates."""
        keys = rng.sample([k for k in fleet.at if first <= k[1] <= last], count)
        return [fleet.at[k] for k in keys]

    def late(first: int, last: int, count: int) -> list[Planned]:
        return [fleet.again(name, rng.randint(first, last)) for name in some(count)]

    # On the parent: minute 0 and a third of minute 1, some readings twice.
    for second in range(SPLIT_AT):
        p.put(fleet.second(second))
        if second == 40:
            p.gate()
    p.put(earlier(0, SPLIT_AT - 1, 500), p.duplicates)
    p.reshard("split")
    # On the children: minute 0's late readings (its windows were put on the parent), then
    # minute 1's rest and a third of minute 2, minute 1's own late readings, duplicates of
    # both sides of the split.
    p.put(late(50, 59, 400), p.late)
    for second in range(SPLIT_AT, MERGE_AT):
        p.put(fleet.second(second))
        if second == 100:
            p.gate()
        if second == 135:
            p.put(late(100, 119, 400), p.late)
    p.put(earlier(0, MERGE_AT - 1, 500), p.duplicates)
    p.reshard("merge")
    # On the merged shard: late readings of the children's minute, minute 2's rest, more late
    # readings, one closing reading each in minute 3 (minute 2's windows are due, minute 3's
    # go on the idle timeout), duplicates, and readings past the horizon.
    p.put(late(90, 119, 300), p.late)
    for second in range(MERGE_AT, LAST):
        p.put(fleet.second(second))
        if second == 155:
            p.gate()
        if second == 170:
            p.put(late(95, 119, 400), p.late)
    p.put([fleet.closing(name) for name in some(len(FLEET))])
    p.put(earlier(60, LAST - 1, 500), p.duplicates)
    p.put(late(0, 34, 300), p.past_horizon)
    return p


# --- what the readings give ---------------------------------------------------------------

RowKey = tuple[str, int]
"""(Name, window start in epoch ms): an item's key in the table."""
FIELDS = ("Distance", "MinMagicPoints", "MaxMagicPoints", "MinHealthPoints", "MaxHealthPoints")


@dataclass(frozen=True)
class Alert:
    name: str
    state: str
    minute_ms: int
    min_magic_points: int


@dataclass
class Expected:
    rows: dict[RowKey, dict[str, Decimal]]
    refused: list[int]
    """Indices of the readings dead-lettered as `late`."""
    alerts: list[Alert]


@dataclass
class _Unicorn:
    latest_ms: int
    counted: set[int] = field(default_factory=set)
    windows: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    on_time_min: dict[int, int] = field(default_factory=dict)
    """Per window, the least magic among readings merged before it was due (its first put)."""


def expect(p: Plan) -> Expected:
    """What the table and the alerts must end up with, by the rules of docs/how-it-works.md."""
    unicorns: dict[str, _Unicorn] = {}
    refused: list[int] = []
    for index, planned in enumerate(p.readings):
        t = planned.time_ms
        start = t - t % WINDOW_MS
        unicorn = unicorns.setdefault(planned.name, _Unicorn(t))
        oldest = unicorn.latest_ms - LATENESS_MS - HORIZON_MS
        if t in unicorn.counted:
            # Same Name and StatusTime as one counted: not counted again (its window is kept:
            # windows go only once they are past the horizon).
            assert start + WINDOW_MS - oldest >= MARGIN_MS, index
            assert index in p.duplicates, index
            continue
        if t < oldest:
            assert oldest - t >= MARGIN_MS, index
            assert index in p.past_horizon, index
            refused.append(index)
            continue
        assert t - oldest >= MARGIN_MS, index
        assert index not in p.past_horizon, index
        unicorn.counted.add(t)
        unicorn.latest_ms = max(unicorn.latest_ms, t)
        unicorn.windows.setdefault(start, []).append(planned.record)
        due = start + WINDOW_MS <= unicorn.latest_ms - LATENESS_MS
        assert due == (index in p.late), index  # the plan's late readings are late, only they
        if not due:
            magic = planned.record["MagicPoints"]
            unicorn.on_time_min[start] = min(unicorn.on_time_min.get(start, magic), magic)

    rows: dict[RowKey, dict[str, Decimal]] = {}
    alerts: list[Alert] = []
    for name, unicorn in unicorns.items():
        low = False
        for start in sorted(unicorn.windows):
            readings = unicorn.windows[start]
            rows[name, start] = {
                "Distance": sum((Decimal(repr(r["Distance"])) for r in readings), Decimal(0)),
                "MinMagicPoints": Decimal(min(r["MagicPoints"] for r in readings)),
                "MaxMagicPoints": Decimal(max(r["MagicPoints"] for r in readings)),
                "MinHealthPoints": Decimal(min(r["HealthPoints"] for r in readings)),
                "MaxHealthPoints": Decimal(max(r["HealthPoints"] for r in readings)),
            }
            first_put = unicorn.on_time_min[start]
            # Late readings are never low: a window is low in its first put or never.
            assert (first_put < THRESHOLD) == (rows[name, start]["MinMagicPoints"] < THRESHOLD)
            if (first_put < THRESHOLD) != low:
                low = first_put < THRESHOLD
                alerts.append(Alert(name, "firing" if low else "resolved", start, first_put))
    return Expected(rows, refused, alerts)


def table_rows(items: Sequence[Mapping[str, Any]]) -> dict[RowKey, dict[str, Decimal]]:
    """Items of `UnicornSensorData` (StatusTime as epoch ms) in the shape of `Expected.rows`."""
    return {
        (item["Name"]["S"], int(item["StatusTime"]["N"])): {
            f: Decimal(item[f]["N"]) for f in FIELDS if f in item
        }
        for item in items
    }


# --- putting the plan on the stream -------------------------------------------------------


class Feed:
    """Puts a plan's readings in its order (PutRecords, 500 a call) and reshards the raw
    stream where it says: the parent at MIDDLE, then the two children back into one."""

    def __init__(self, kinesis: Any, stream: str, p: Plan) -> None:
        self._kinesis = kinesis
        self._stream = stream
        self._plan = p
        self.results: list[dict[str, Any]] = []
        """PutRecords' answer for each reading put so far (ShardId, SequenceNumber)."""
        self.put_count = 0
        self.open_after: dict[str, list[str]] = {}
        """The open shards' ids after each reshard ("split", "merge")."""
        self._gates = [(asyncio.Event(), asyncio.Event()) for s in p.steps if s[0] == "gate"]
        """Per gate of the plan, in order: (reached, go on)."""

    async def reached(self, gate: int, feeding: asyncio.Task[None], timeout: float = 120) -> None:
        """Wait until the feed (`run`, in the task `feeding`) stops at the plan's gate number
        `gate` (0, 1, ...); what made the feed fail, if it did."""
        waiting = asyncio.create_task(self._gates[gate][0].wait())
        try:
            await asyncio.wait((waiting, feeding), timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            waiting.cancel()
        if feeding.done():
            feeding.result()
        if not self._gates[gate][0].is_set():
            raise TimeoutError(f"the feed did not reach gate {gate} within {timeout}s")

    def go_on(self, gate: int) -> None:
        self._gates[gate][1].set()

    async def run(self) -> None:
        gates = iter(self._gates)
        for step in self._plan.steps:
            if step[0] == "put":
                await self._put(step[1], step[2])
            elif step[0] == "gate":
                reached, go_on = next(gates)
                reached.set()
                await go_on.wait()
            else:
                await self._reshard(step[0])
                self.open_after[step[0]] = [s["ShardId"] for s in await self.open_shards()]

    async def _put(self, first: int, end: int) -> None:
        readings = self._plan.readings
        for start in range(first, end, 500):
            batch = readings[start : min(start + 500, end)]
            entries = [
                {
                    "Data": json.dumps(r.record, separators=(",", ":")).encode(),
                    "PartitionKey": r.name,
                }
                for r in batch
            ]
            response = await self._kinesis.put_records(StreamName=self._stream, Records=entries)
            assert response.get("FailedRecordCount", 0) == 0, response
            self.results.extend(response["Records"])
            self.put_count = len(self.results)

    async def open_shards(self) -> list[dict[str, Any]]:
        shards = (await self._kinesis.list_shards(StreamName=self._stream))["Shards"]
        return [s for s in shards if "EndingSequenceNumber" not in s["SequenceNumberRange"]]

    async def _reshard(self, step: str) -> None:
        shards = await self.open_shards()
        if step == "split":
            [parent] = shards
            await self._kinesis.split_shard(
                StreamName=self._stream,
                ShardToSplit=parent["ShardId"],
                NewStartingHashKey=str(MIDDLE),
            )
        else:
            low, high = sorted(shards, key=lambda s: int(s["HashKeyRange"]["StartingHashKey"]))
            await self._kinesis.merge_shards(
                StreamName=self._stream,
                ShardToMerge=low["ShardId"],
                AdjacentShardToMerge=high["ShardId"],
            )

        async def active() -> bool:
            summary = await self._kinesis.describe_stream_summary(StreamName=self._stream)
            return bool(summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE")

        await wait_for(active, timeout=30)


# --- the services as child processes ------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    owned: float
    read: float
    checkpoints: float
    reading: frozenset[str]
    """Shards it has had a GetRecords answer for in its current tenure."""
    read_by_shard: dict[str, float]


class Pipeline:
    """The aggregator replicas and `run`, each a `python -m wildrydes_stream` child."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = dict(env)
        self.aggregators: dict[str, ServiceProcess] = {}
        self.copier: ServiceProcess | None = None
        self._ended: list[tuple[str, ServiceProcess]] = []
        self._generation = 0

    async def start_aggregator(self, replica: str) -> None:
        """A replica under a new worker id each start (a restarted pod's process differs)."""
        self._generation += 1
        worker = f"{replica}-{self._generation}"
        child = await ServiceProcess.start(
            {**self._env, "WILDRYDES_WORKER_ID": worker}, "aggregate"
        )
        self.aggregators[replica] = child
        await child.started(timeout=60)

    async def start_copier(self, **variables: str) -> None:
        self.copier = await ServiceProcess.start(
            {**self._env, "WILDRYDES_WORKER_ID": "copier", **variables}, "run"
        )
        await self.copier.started(timeout=60)

    async def stop(self, replica: str, signum: signal.Signals, timeout: float = 60.0) -> int:
        child = self.aggregators.pop(replica)
        self._ended.append((f"{replica} (stopped)", child))
        child.send(signum)
        return await child.wait(timeout)

    async def scrape(self, replica: str) -> Scrape:
        status, text = await self.aggregators[replica].get("/metrics")
        assert status == 200, text
        totals = dict.fromkeys(
            (
                "wildrydes_shards_owned",
                "wildrydes_records_read_total",
                "wildrydes_checkpoints_total",
            ),
            0.0,
        )
        reading = set()
        read_by_shard: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
                if sample.name == "wildrydes_shard_behind_latest_seconds":
                    reading.add(sample.labels["shard"])
                if sample.name == "wildrydes_records_read_total":
                    read_by_shard[sample.labels["shard"]] = sample.value
        return Scrape(
            totals["wildrydes_shards_owned"],
            totals["wildrydes_records_read_total"],
            totals["wildrydes_checkpoints_total"],
            frozenset(reading),
            read_by_shard,
        )

    async def reader(self, shard: str, read_at_least: float, timeout: float = 60.0) -> str:
        """The replica reading `shard`, once it has checkpointed and read this many of the
        shard's readings (since it started)."""
        found: list[str] = []
        scrapes: dict[str, Scrape] = {}

        async def reading() -> bool:
            for replica in list(self.aggregators):
                scrape = scrapes[replica] = await self.scrape(replica)
                read = scrape.read_by_shard.get(shard, 0.0)
                if shard in scrape.reading and scrape.checkpoints and read >= read_at_least:
                    found.append(replica)
                    return True
            return False

        try:
            await wait_for(reading, timeout=timeout, interval=0.25)
        except TimeoutError:
            raise AssertionError(
                f"no replica read {read_at_least} of {shard} within {timeout}s: {scrapes}\n"
                f"{self.describe(everything=True)}"
            ) from None
        return found[0]

    def describe(self, everything: bool = False) -> str:
        """What every child logged at WARNING or above (`everything`: every line but the
        alerts), in time order, for a failure message."""
        children = [*self._ended, *self.aggregators.items()]
        if self.copier is not None:
            children.append(("copier", self.copier))
        lines = []
        for name, child in children:
            for entry in child.logs():
                alert = entry.get("logger") == "wildrydes_stream.alerts.log"
                serious = everything or entry.get("level") in ("WARNING", "ERROR", "CRITICAL")
                if serious and not alert:
                    lines.append((str(entry.get("time")), f"{name}: {json.dumps(entry)}"))
        return "\n".join(line for _, line in sorted(lines)[-300:])

    async def close(self) -> None:
        children = [*self.aggregators.values(), *(child for _, child in self._ended)]
        if self.copier is not None:
            children.append(self.copier)
        await asyncio.gather(*(child.close() for child in children))
