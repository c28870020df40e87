"""The aggregator's memory is bounded in bytes through a PutRecords outage of any length.

Windows not yet put are charged to `max_buffered_bytes` until their put is acknowledged
(aggregate/memory.py): while PutRecords fails they pile up, fill the budget, and the pollers read
no more; once puts go through again every window comes out exactly as its readings give it.
The charges themselves are checked against what tracemalloc sees windows and records hold.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from tests.aggregate.test_aggregate import dead_letters, reference, wait_output
from tests.aggregate.test_fleet import minute_of
from tests.faultproxy import AwsError, FaultProxy
from tests.helpers import Peak, holds, put_records, wait_for
from wildrydes_stream.aggregate.app import Aggregation, Aggregator
from wildrydes_stream.aggregate.memory import RECORD_BYTES, WINDOW_BYTES
from wildrydes_stream.aggregate.readings import Reading, decode_reading
from wildrydes_stream.aggregate.windows import ShardWindows
from wildrydes_stream.config import Settings
from wildrydes_stream.runtime.budget import ByteBudget

KINESIS_UNAVAILABLE = AwsError(503, "ServiceUnavailable", "Service Unavailable")
HERD = [f"unicorn-{i:03d}" for i in range(100)]
BOUND = 512 * 1024
PAGE = 20
"""GetRecords Limit: what one page can add to the budget before its poller waits is small."""


def read_total(aggregator: Aggregator) -> float:
    return sum(
        sample.value
        for family in aggregator.metrics.registry.collect()
        if family.name == "wildrydes_records_read"
        for sample in family.samples
        if sample.name == "wildrydes_records_read_total"
    )


async def test_a_putrecords_outage_stops_the_pollers_at_the_byte_bound_and_loses_no_window(
    streams: Settings, kinesis: Any, kinesis_proxy: FaultProxy
) -> None:
    # The writer's record count never binds here: only the byte bound can stop the pollers.
    s = streams.replace(max_buffered_bytes=BOUND, queue_size=1_000_000, get_records_limit=PAGE)
    # 100 unicorns, 20 minutes, a reading every 10 s: 2,000 windows, about 4 MB of charges.
    readings = [r for m in range(20) for r in minute_of(HERD, m, range(0, 60, 10), m)]
    await put_records(kinesis, s.raw_stream_name, readings)
    kinesis_proxy.fail("PutRecords", KINESIS_UNAVAILABLE, times=None)
    aggregator = Aggregator(s)
    budget = aggregator.budget
    peak = Peak(budget)
    aggregation = aggregator.windows.aggregation

    def puts_failed() -> int:
        return kinesis_proxy.injected["PutRecords"]

    def after_failed_puts(count: int) -> Callable[[], Any]:
        target = puts_failed() + count
        return holds(lambda: puts_failed() >= target)

    try:
        await aggregator.start()
        # Windows waiting for PutRecords fill the budget; the pollers then wait for room.
        await wait_for(holds(lambda: not budget.room.is_set()), timeout=60)
        await wait_for(after_failed_puts(5), timeout=30)  # pages in flight are merged by now
        calls, read = kinesis_proxy.calls["GetRecords"], read_total(aggregator)
        await wait_for(after_failed_puts(20), timeout=60)
        assert kinesis_proxy.calls["GetRecords"] == calls, "a poller read on a full budget"
        assert read_total(aggregator) == read < len(readings)
        assert not budget.room.is_set()
        # What fills it is windows: the pollers stop once a page's reservation no longer fits,
        # and the bound is passed by no more than one page per shard.
        assert aggregation.held_bytes() >= BOUND - budget.page_bytes - 2 * PAGE * 1024
        assert peak.value <= BOUND + 2 * PAGE * (WINDOW_BYTES + RECORD_BYTES)

        kinesis_proxy.clear()
        await wait_output(kinesis, s.stream_name, reference(readings), timeout=180)
        await wait_for(holds(lambda: aggregation.held_bytes() == 0))
        assert read_total(aggregator) == len(readings)
    finally:
        await aggregator.stop()
    assert peak.value <= BOUND + 2 * PAGE * (WINDOW_BYTES + RECORD_BYTES)
    assert not dead_letters(s)


# --- the charges, against what windows really hold -----------------------------------------


def traced(build: Callable[[], Any]) -> tuple[int, Any]:
    """Bytes allocated by `build` that are still held once it returns, and its result."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, kept
    finally:
        tracemalloc.stop()


def decoded_readings(per_minute: int, minutes: int) -> list[bytes]:
    seconds = range(0, 60, 60 // per_minute)
    raw = [r for m in range(minutes) for r in minute_of(HERD, m, seconds, 40 + m)]
    return [json.dumps(r).encode() for r in raw]


def merge(windows: ShardWindows, records: list[bytes]) -> ShardWindows:
    for data in records:
        reading: Reading = decode_reading(data)[1]
        windows.add(reading, 0.0)
    windows.changes()
    return windows


@pytest.mark.parametrize(("per_minute", "minutes"), [(1, 1), (60, 1), (60, 3)])
def test_windows_are_charged_at_least_what_they_hold(per_minute: int, minutes: int) -> None:
    budget = ByteBudget(1 << 40)
    data = decoded_readings(per_minute, minutes)
    size, windows = traced(lambda: merge(ShardWindows("s", 60_000, 0, 3_600_000, budget), data))
    assert windows.held == budget.used >= size


def charged_aggregation(budget: ByteBudget) -> Aggregation:
    """An aggregation holding shard "s", its windows charged to `budget`."""
    settings = Settings()
    aggregation = Aggregation(settings)
    aggregation.shards["s"] = ShardWindows(
        "s", settings.window_seconds * 1000, 60_000, 3_600_000, budget
    )
    return aggregation


def test_queued_records_are_covered_and_every_charge_is_given_back_once_put() -> None:
    budget = ByteBudget(1 << 40)
    aggregation = charged_aggregation(budget)
    windows = aggregation.shards["s"]
    first = decoded_readings(6, 2)
    # More readings for windows whose first put is still queued: each is put a second time.
    more = [r for r in decoded_readings(60, 2) if r not in first][:200]

    def put_idle_windows() -> list[Any]:
        return [aggregation.record(e) for name in HERD for e in windows.idle(name)]

    def queue_twice() -> list[Any]:
        merge(windows, first)
        records = put_idle_windows()
        merge(windows, more)
        return records + put_idle_windows()

    size, records = traced(queue_twice)
    assert len(records) > len({r.key for r in records}), "no window was put twice"
    assert windows.held == budget.used >= size
    for record in records:
        record.finish()
    assert windows.held == budget.used == 0
    assert not any(w.unput for u in windows.unicorns.values() for w in u.windows.values())


def test_a_shard_no_longer_held_gives_its_windows_charges_back() -> None:
    budget = ByteBudget(1 << 40)
    aggregation = charged_aggregation(budget)
    merge(aggregation.shards["s"], decoded_readings(6, 2))
    state = aggregation.shards["s"].entries()
    assert budget.used == aggregation.held_bytes() > 0
    aggregation.forget("s")
    assert budget.used == 0
    # Taken again from its checkpoint: the unput windows it stored are charged again.
    again = ShardWindows("s", 60_000, 60_000, 3_600_000, budget)
    again.restore([state])
    assert budget.used == again.held > 0
