"""`aggregate`: raw readings -> one record per unicorn per minute on the aggregated stream.

Every test puts readings on a raw stream in kinesalite, runs the aggregator (in process, or as
a child process for kill -9) and compares what lands on the output stream, latest record per
(Name, StatusTime), with a reference computed here from the same readings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import generate_latest

from tests.faultproxy import KINESIS_THROTTLED, FaultProxy
from tests.helpers import holds, put_records, scan_table, wait_for
from tests.process import ServiceProcess, run_to_exit, service_env
from wildrydes_stream.admin.provision import ensure_stream, ensure_table
from wildrydes_stream.aggregate.app import Aggregator
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.consumer.statestore import StateRef, StateStore
from wildrydes_stream.copy.app import Service
from wildrydes_stream.produce.model import NAMES, Unicorn, status_time
from wildrydes_stream.records.fields import status_time_to_epoch_ms

T0 = datetime(2017, 6, 5, 9, 17, tzinfo=UTC)
Key = tuple[str, str]


def reading(
    name: str, at: datetime, distance: float | int, magic: int, health: int
) -> dict[str, Any]:
    return {
        "Distance": distance,
        "HealthPoints": health,
        "Latitude": 40.749,
        "Longitude": -73.985,
        "MagicPoints": magic,
        "Name": name,
        "StatusTime": status_time(at),
    }


def ride(name: str, seconds: Iterable[int], seed: int) -> list[dict[str, Any]]:
    """Readings of one unicorn at T0 + each second, float distances."""
    rng = random.Random(seed)
    return [
        reading(
            name,
            T0 + timedelta(seconds=s, milliseconds=rng.randint(0, 999)),
            round(rng.uniform(0, 40), rng.choice((0, 1, 2))),
            rng.randint(40, 200),
            rng.randint(40, 200),
        )
        for s in seconds
    ]


def interleave(*rides: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for group in zip(*rides, strict=True) for r in group]


def reference(readings: Iterable[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """What the aggregated stream must end up holding, computed the obvious way."""
    windows: dict[Key, list[dict[str, Any]]] = {}
    for r in readings:
        start = r["StatusTime"][:16] + ":00.000"
        windows.setdefault((r["Name"], start), []).append(r)
    return {
        key: {
            "Name": key[0],
            "StatusTime": key[1],
            "Distance": sum((Decimal(str(r["Distance"])) for r in rs), Decimal(0)),
            "MinMagicPoints": min(r["MagicPoints"] for r in rs),
            "MaxMagicPoints": max(r["MagicPoints"] for r in rs),
            "MinHealthPoints": min(r["HealthPoints"] for r in rs),
            "MaxHealthPoints": max(r["HealthPoints"] for r in rs),
        }
        for key, rs in windows.items()
    }


async def read_stream(kinesis: Any, stream: str) -> list[bytes]:
    """Every record on the stream, shard by shard in order."""
    data: list[bytes] = []
    shards = (await kinesis.list_shards(StreamName=stream))["Shards"]
    for shard in shards:
        iterator = (
            await kinesis.get_shard_iterator(
                StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )
        )["ShardIterator"]
        while iterator:
            page = await kinesis.get_records(ShardIterator=iterator, Limit=10000)
            data += [r["Data"] for r in page["Records"]]
            if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
                break
            iterator = page.get("NextShardIterator")
    return data


def decoded(data: bytes) -> dict[str, Any]:
    return dict(json.loads(data, parse_float=Decimal))


async def latest(kinesis: Any, stream: str) -> dict[Key, dict[str, Any]]:
    """The latest record per (Name, StatusTime): what `run` leaves in the table."""
    out: dict[Key, dict[str, Any]] = {}
    for data in await read_stream(kinesis, stream):
        record = decoded(data)
        out[record["Name"], record["StatusTime"]] = record
    return out


async def wait_output(
    kinesis: Any, stream: str, expected: dict[Key, dict[str, Any]], timeout: float = 60.0
) -> None:
    seen: dict[Key, dict[str, Any]] = {}

    async def done() -> bool:
        nonlocal seen
        seen = await latest(kinesis, stream)
        return seen == expected

    try:
        await wait_for(done, timeout, interval=0.2)
    except TimeoutError:
        diff = {k: (seen.get(k), v) for k, v in expected.items() if seen.get(k) != v}
        extra = set(seen) - set(expected)
        raise AssertionError(f"output differs: {diff}; unexpected keys {extra}") from None


def aggregate_settings(settings: Settings, **changes: Any) -> Settings:
    defaults: dict[str, Any] = {
        "raw_stream_name": settings.stream_name + "-raw",
        "aggregate_lease_table_name": settings.lease_table_name + "-aggregate",
        "allowed_lateness_seconds": 10.0,
        "idle_window_timeout_seconds": 1.0,
        "late_horizon_seconds": 120.0,
    }
    return settings.replace(**(defaults | changes))


@contextlib.asynccontextmanager
async def aggregating(settings: Settings) -> AsyncIterator[Aggregator]:
    aggregator = Aggregator(settings)
    try:
        await aggregator.start()
        yield aggregator
    finally:
        await aggregator.stop()


def metric(aggregator: Aggregator, name: str, **labels: str) -> float:
    value = aggregator.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def checkpoints(dynamodb: Any, table: str) -> dict[str, str]:
    leases = await LeaseTable(dynamodb, table, "reader").all()
    return {shard: lease.checkpoint for shard, lease in leases.items()}


def dead_letters(settings: Settings) -> list[dict[str, Any]]:
    try:
        with open(settings.deadletter_file) as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except FileNotFoundError:
        return []


# --- aggregates, lateness, the horizon ------------------------------------------------------


async def test_aggregates_equal_the_reference_with_out_of_order_and_late_readings(
    streams: Settings, kinesis: Any
) -> None:
    s = streams
    names = ("Shadowfax", "Rocinante", "Bucephalus")
    rides = [ride(name, range(180), seed) for seed, name in enumerate(names)]
    readings = interleave(*rides)
    # Out of order within the lateness (10 s): each block of 6 readings (2 s) reversed.
    shuffled = [r for i in range(0, len(readings), 6) for r in reversed(readings[i : i + 6])]
    await put_records(kinesis, s.raw_stream_name, shuffled)
    async with aggregating(s) as aggregator:
        await wait_output(kinesis, s.stream_name, reference(readings))
        first_puts = [decoded(d) for d in await read_stream(kinesis, s.stream_name)]
        # Minutes 0 and 1 closed on the watermark; minute 2 on the idle timeout: each once.
        assert len(first_puts) == len(reference(readings))
        assert metric(aggregator, "wildrydes_aggregate_windows_reemitted_total") == 0

        # A late reading for minute 0 (the watermark is at 179 - 10 s): merged, put again.
        late = reading("Shadowfax", T0 + timedelta(seconds=59), 0.25, 1, 250)
        # Beyond the horizon (120 s behind the watermark): dead-lettered as late.
        too_late = reading("Shadowfax", T0 - timedelta(seconds=5), 7, 100, 100)
        [late_put, too_late_put] = await put_records(kinesis, s.raw_stream_name, [late, too_late])
        expected = reference([*readings, late])
        await wait_output(kinesis, s.stream_name, expected)
        await wait_for(holds(lambda: any(e["kind"] == "late" for e in dead_letters(s))))
        # The file holds the letter before the metric counts it: wait for the count too.
        late_letters = "wildrydes_records_dead_lettered_total"
        await wait_for(holds(lambda: metric(aggregator, late_letters, reason="late") >= 1))

        assert metric(aggregator, "wildrydes_aggregate_windows_reemitted_total") == 1
        assert metric(aggregator, "wildrydes_aggregate_late_readings_total", outcome="merged") == 1
        assert (
            metric(aggregator, "wildrydes_aggregate_late_readings_total", outcome="dead_lettered")
            == 1
        )
        assert metric(aggregator, "wildrydes_records_dead_lettered_total", reason="late") == 1
        assert metric(aggregator, "wildrydes_aggregate_windows_open") == 0
        assert metric(aggregator, "wildrydes_aggregate_windows_emitted_total") == len(expected) + 1
        delays = [
            metric(aggregator, "wildrydes_aggregate_watermark_delay_seconds", shard=shard)
            for shard in aggregator.windows.aggregation.shards
        ]
        assert all(d > 0 for d in delays)
    [letter] = [e for e in dead_letters(s) if e["kind"] == "late"]
    assert letter["sequence_number"] == too_late_put["SequenceNumber"]
    assert late_put["SequenceNumber"] != letter["sequence_number"]
    # Whole sums print without a decimal point, others exactly.
    for data in await read_stream(kinesis, s.stream_name):
        record = decoded(data)
        text = data.decode()
        if record["Distance"] == record["Distance"].to_integral_value():
            assert f'"Distance":{int(record["Distance"])},' in text
    assert json.loads((await read_stream(kinesis, s.stream_name))[0]).keys() == {
        "Name",
        "StatusTime",
        "Distance",
        "MinMagicPoints",
        "MaxMagicPoints",
        "MinHealthPoints",
        "MaxHealthPoints",
    }


async def test_idle_timeout_puts_the_last_minute_of_a_ride(streams: Settings, kinesis: Any) -> None:
    s = streams
    readings = ride("Epona", range(20), 7)  # 20 s: the watermark never passes minute 0
    await put_records(kinesis, s.raw_stream_name, readings)
    async with aggregating(s.replace(idle_window_timeout_seconds=0.5)) as aggregator:
        await wait_output(kinesis, s.stream_name, reference(readings))
        assert metric(aggregator, "wildrydes_aggregate_windows_open") == 0


async def test_invalid_readings_are_dead_lettered_and_the_shard_moves_on(
    settings: Settings, kinesis: Any, dynamodb: Any
) -> None:
    s = aggregate_settings(settings)
    await ensure_stream(kinesis, s.raw_stream_name, 1)
    await ensure_stream(kinesis, s.stream_name, 1)
    good = ride("Artax", range(30), 3)
    bad: list[bytes | dict[str, Any]] = [
        b"not json",
        json.dumps({**good[0], "Name": ""}).encode(),
        json.dumps({k: v for k, v in good[0].items() if k != "StatusTime"}).encode(),
        json.dumps({**good[0], "MagicPoints": "lots"}).encode(),
        b"[" * 5000,
    ]
    mixed: list[bytes | dict[str, Any]] = [*good[:10], *bad, *good[10:]]
    results = await put_records(kinesis, s.raw_stream_name, mixed)
    async with aggregating(s) as aggregator:
        await wait_output(kinesis, s.stream_name, reference(good))
        letters = [e for e in dead_letters(s) if e["kind"] == "invalid_record"]
        assert len(letters) == len(bad)
        last = results[-1]["SequenceNumber"]
        await wait_for(
            lambda: _checkpoint_is(dynamodb, s.aggregate_lease_table_name, last), timeout=30
        )
        assert metric(
            aggregator, "wildrydes_records_read_total", shard=letters[0]["shard_id"]
        ) == len(mixed)


async def _checkpoint_is(dynamodb: Any, table: str, sequence: str) -> bool:
    return list((await checkpoints(dynamodb, table)).values()) == [sequence]


# --- restarts -------------------------------------------------------------------------------


async def test_a_window_spanning_a_restart_is_put_with_all_its_readings(
    settings: Settings, kinesis: Any, dynamodb: Any
) -> None:
    s = aggregate_settings(settings, idle_window_timeout_seconds=0.5)
    await ensure_stream(kinesis, s.raw_stream_name, 1)
    await ensure_stream(kinesis, s.stream_name, 1)
    shadowfax, rocinante = ride("Shadowfax", range(90), 11), ride("Rocinante", range(90), 12)
    before = interleave(shadowfax[:30], rocinante[:30])
    after = interleave(shadowfax[30:], rocinante[30:])
    results = await put_records(kinesis, s.raw_stream_name, before)
    async with aggregating(s):
        # Minute 0 half read, put by the idle timeout, and checkpointed past its readings.
        await wait_output(kinesis, s.stream_name, reference(before))
        last = results[-1]["SequenceNumber"]
        await wait_for(lambda: _checkpoint_is(dynamodb, s.aggregate_lease_table_name, last))
    [lease] = (await LeaseTable(dynamodb, s.aggregate_lease_table_name, "r").all()).values()
    store = StateStore(
        dynamodb, s.replace(lease_table_name=s.aggregate_lease_table_name).state_table_name
    )
    entries = await store.load(lease.shard_id, StateRef.decode(lease.state_ref))
    windows = sorted(key for key in entries if key[1].startswith("w:"))
    assert [name for name, _ in windows] == ["Rocinante", "Shadowfax"]

    await put_records(kinesis, s.raw_stream_name, after)
    async with aggregating(s.replace(worker_id="another-worker")):
        # Without the stored windows, minute 0 would come out with its second half only.
        await wait_output(kinesis, s.stream_name, reference(before + after))


@pytest.mark.slow
async def test_kill_9_mid_stream_then_restart_leaves_every_window_right(
    streams: Settings, kinesis: Any, aws_env: dict[str, str]
) -> None:
    s = streams.replace(get_records_limit=20, min_poll_interval_seconds=0.1)
    herd = [Unicorn(name, random.Random(i)) for i, name in enumerate(NAMES[:4])]
    readings = [
        unicorn.reading(T0 + timedelta(seconds=second)).as_dict()
        for second in range(300)
        for unicorn in herd
    ]
    await put_records(kinesis, s.raw_stream_name, readings)
    env = service_env(s, aws_env)
    victim = await ServiceProcess.start(env, "aggregate")
    try:
        await victim.started()
        await wait_for(lambda: _some_output(kinesis, s.stream_name, 3), timeout=60, interval=0.05)
        victim.send(signal.SIGKILL)
        assert await victim.wait(timeout=10) == -signal.SIGKILL
    finally:
        await victim.close()
    expected = reference(readings)
    assert await latest(kinesis, s.stream_name) != expected, "killed after the end"
    survivor = await ServiceProcess.start(env, "aggregate")
    try:
        await survivor.started()
        await wait_output(kinesis, s.stream_name, expected, timeout=120)
        survivor.send(signal.SIGTERM)
        assert await survivor.wait(timeout=30) == 0
    finally:
        await survivor.close()


async def _some_output(kinesis: Any, stream: str, count: int) -> bool:
    return len(await read_stream(kinesis, stream)) >= count


# --- a window not yet put is never lost -----------------------------------------------------


async def test_windows_not_yet_put_are_checkpointed_as_unput_and_put_after_a_restart(
    streams: Settings, kinesis: Any, dynamodb: Any, kinesis_proxy: FaultProxy
) -> None:
    """Readings are done once merged, so the checkpoint passes them while PutRecords fails;
    the state stored with it marks their windows unput, and whoever reads on puts them."""
    s = streams
    readings = interleave(ride("Pegasus", range(150), 21), ride("Brego", range(150), 22))
    await put_records(kinesis, s.raw_stream_name, readings)
    kinesis_proxy.fail("PutRecords", KINESIS_THROTTLED, times=None)
    async with aggregating(s) as aggregator:
        await wait_for(holds(lambda: kinesis_proxy.injected["PutRecords"] >= 5))
        await wait_for(lambda: _all_checkpointed(dynamodb, s))
        assert await read_stream(kinesis, s.stream_name) == []
        leases = await LeaseTable(dynamodb, s.aggregate_lease_table_name, "r").all()
        store = aggregator.state_store
        assert store is not None
        unput = 0
        for lease in leases.values():
            entries = await store.load(lease.shard_id, StateRef.decode(lease.state_ref))
            unput += sum(1 for (_, part), v in entries.items() if part.startswith("w:") and v[3])
        assert unput > 0
    # Stopped with the puts still refused (the grace period ends the drain).
    kinesis_proxy.clear()
    kinesis_proxy.fail_entries(times=3, forward=0)
    async with aggregating(s.replace(worker_id="another-worker")):
        await wait_output(kinesis, s.stream_name, reference(readings))
        assert not dead_letters(s)


async def _all_checkpointed(dynamodb: Any, s: Settings) -> bool:
    values = (await checkpoints(dynamodb, s.aggregate_lease_table_name)).values()
    return all(v.isdigit() for v in values) and len(values) == 2


# --- the whole pipeline -----------------------------------------------------------------------


async def test_produce_model_to_aggregate_to_run_fills_the_table_with_the_reference(
    streams: Settings, kinesis: Any, dynamodb: Any
) -> None:
    s = streams
    await ensure_table(dynamodb, s)
    herd = [Unicorn(name, random.Random(100 + i)) for i, name in enumerate(NAMES[:3])]
    readings = [
        unicorn.reading(T0 + timedelta(seconds=second)).as_dict()
        for second in range(150)
        for unicorn in herd
    ]
    await put_records(kinesis, s.raw_stream_name, readings)
    expected = reference(readings)
    service = Service(s)
    async with aggregating(s), service:

        async def table_is_complete() -> bool:
            return len(await scan_table(dynamodb, s.table_name)) == len(expected)

        await wait_for(table_is_complete, timeout=60)
        await wait_output(kinesis, s.stream_name, expected)
    rows = {
        (item["Name"]["S"], int(item["StatusTime"]["N"])): {
            k: Decimal(v["N"]) for k, v in item.items() if "N" in v and k != "StatusTime"
        }
        for item in await scan_table(dynamodb, s.table_name)
    }
    assert rows == {
        (name, status_time_to_epoch_ms(start)): {
            k: Decimal(v) for k, v in record.items() if k not in ("Name", "StatusTime")
        }
        for (name, start), record in expected.items()
    }


# --- the command ------------------------------------------------------------------------------


async def test_aggregate_refuses_to_start_without_its_output_stream(
    settings: Settings, kinesis: Any, aws_env: dict[str, str]
) -> None:
    s = aggregate_settings(settings)
    await ensure_stream(kinesis, s.raw_stream_name, 1)
    code, _, stderr = await run_to_exit(service_env(s, aws_env), "aggregate")
    assert code == 1
    assert f"output Kinesis stream {s.stream_name!r} does not exist" in stderr


async def test_aggregate_without_its_raw_stream_names_raw_stream_name(
    settings: Settings, kinesis: Any, aws_env: dict[str, str]
) -> None:
    s = aggregate_settings(settings)
    await ensure_stream(kinesis, s.stream_name, 1)
    code, _, stderr = await run_to_exit(service_env(s, aws_env), "aggregate")
    assert code == 1
    assert stderr.splitlines() == [
        f"wildrydes-stream: Kinesis stream {s.raw_stream_name!r} does not exist: create it or "
        "set raw_stream_name (WILDRYDES_RAW_STREAM_NAME)"
    ]


async def test_the_aggregator_names_its_streams_and_exports_only_what_applies_to_it(
    streams: Settings, kinesis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    s = streams
    # StatusTime an hour ahead of the clock, as a simulated fleet (`local --speed 60`) runs.
    ahead = datetime.now(UTC) + timedelta(hours=1)
    readings = [reading("Shadowfax", ahead + timedelta(seconds=i), 1, 100, 100) for i in range(3)]
    await put_records(kinesis, s.raw_stream_name, readings)

    with caplog.at_level(logging.INFO, logger="wildrydes_stream"):
        async with aggregating(s) as aggregator:
            shards = aggregator.windows.aggregation.shards
            await wait_for(holds(lambda: any(w.watermark_ms for w in shards.values())))
            exposition = generate_latest(aggregator.metrics.registry).decode()
            delays = [
                metric(aggregator, "wildrydes_aggregate_watermark_delay_seconds", shard=shard)
                for shard, windows in shards.items()
                if windows.watermark_ms is not None
            ]

    [started] = [r for r in caplog.records if r.getMessage() == "service started"]
    assert started.stream == s.raw_stream_name  # type: ignore[attr-defined]
    assert started.output_stream == s.stream_name  # type: ignore[attr-defined]
    assert started.lease_table == s.aggregate_lease_table_name  # type: ignore[attr-defined]
    assert not hasattr(started, "table")  # it writes no table
    # The table writers' series do not apply to it.
    for absent in (
        "wildrydes_records_written_total",
        "wildrydes_batch_write_duration_seconds",
        "wildrydes_unprocessed_items_retried_total",
        "wildrydes_write_concurrency_limit",
        "wildrydes_end_to_end_latency_seconds",
        'reason="rejected_by_table"',
        'api="BatchWriteItem"',
    ):
        assert absent not in exposition
    assert 'wildrydes_blocked{api="PutRecords"} 0.0' in exposition
    assert 'wildrydes_records_dead_lettered_total{reason="late"} 0.0' in exposition
    # Event time ahead of the clock is no delay (it read -3,600 here).
    assert delays == [0.0]


# --- the state stored with a checkpoint, alone ------------------------------------------------


def test_windows_rebuilt_from_any_checkpoint_come_out_with_the_same_values() -> None:
    """For every checkpoint C inside interleaved windows: the state stored later than C (the
    windows run ahead of the checkpoint) plus the readings after C, read again, give every
    window exactly the aggregate of all its readings: those read twice count once."""
    from wildrydes_stream.aggregate.readings import decode_reading
    from wildrydes_stream.aggregate.windows import Emission, ShardWindows
    from wildrydes_stream.consumer.state import Entries

    raw = interleave(ride("Falada", range(130), 31), ride("Binky", range(130), 32))
    readings = [decode_reading(json.dumps(r).encode())[1] for r in raw]

    def run(start: int, state: list[Entries]) -> dict[Key, Any]:
        windows = ShardWindows("shardId-0", 60_000, 10_000, 120_000)
        emissions: list[Emission] = windows.restore(state)
        for r in readings[start:]:
            emissions += windows.add(r, 0.0).emissions
        for name in ("Falada", "Binky"):
            emissions += windows.idle(name)
        return {(e.name, str(e.start_ms)): e.values for e in emissions}

    whole = run(0, [])
    for checkpoint in (5, 64, 119, 130, 200, 250):
        first = ShardWindows("shardId-0", 60_000, 10_000, 120_000)
        for r in readings[: checkpoint + 40]:  # read past C before the state is stored
            first.add(r, 0.0)
        state = first.entries()
        again = run(checkpoint + 1, [state])
        assert again, checkpoint
        for key, values in again.items():
            assert values == whole[key], (checkpoint, key)
