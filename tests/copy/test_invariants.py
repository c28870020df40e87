"""The design's invariants, end to end against kinesalite and dynalite.

Per-key order and in-batch de-duplication, a slow write holding the checkpoint back, bad records
dead-lettered without blocking the shard, parents read before children across a split under
load, where a shard without a checkpoint starts (LATEST, AT_TIMESTAMP), and the worker's own
lease writes (checkpointer, SHARD_END, a stop's cancellation) never mistaking each other for
another worker's.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ReadMode
from tests.copy.test_faults import make_records
from tests.helpers import holds, put_records, scan_table, unicorn_day, wait_for
from wildrydes_stream.admin.provision import ensure_stream, ensure_table
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.lease import SHARD_END, Lease
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.copy.app import Service
from wildrydes_stream.records.envelope import ItemKey
from wildrydes_stream.records.fields import status_time_to_epoch_ms
from wildrydes_stream.records.position import position
from wildrydes_stream.sink.dynamodb import Batch, BatchWriter

pytestmark = pytest.mark.timeout(60)

UNICORNS = ("Shadowfax", "Rocinante", "Bucephalus", "Pegasus", "Epona", "Artax")


# --- helpers -------------------------------------------------------------------------------


@functools.cache
def _day() -> tuple[dict[str, Any], ...]:
    return tuple(unicorn_day())


def _minute(minute: int, name: str = "Shadowfax", **fields: Any) -> dict[str, Any]:
    """The real workshop record of one minute of the day, renamed and with fields changed."""
    return {**_day()[minute], "Name": name, **fields}


def _key(record: dict[str, Any]) -> ItemKey:
    return record["Name"], str(status_time_to_epoch_ms(record["StatusTime"]))


def _item_key(item: dict[str, Any]) -> ItemKey:
    return item["Name"]["S"], item["StatusTime"]["N"]


def _sample_total(service: Service, name: str, **labels: str) -> float:
    """Sum of a metric's samples named `name` (and matching `labels`) on the service registry."""
    return sum(
        sample.value
        for family in service.metrics.registry.collect()
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _dead_letters(settings: Settings) -> list[dict[str, Any]]:
    path = Path(settings.deadletter_file)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def _lease_checkpoint(dynamodb: Any, settings: Settings, shard_id: str) -> str | None:
    lease = await LeaseTable(dynamodb, settings.lease_table_name, "test-reader").get(shard_id)
    return None if lease is None else lease.checkpoint


def _assert_clean(service: Service, settings: Settings) -> None:
    """No dead letters, no failed AWS calls, no refused BatchWriteItem."""
    assert _dead_letters(settings) == []
    assert _sample_total(service, "wildrydes_aws_errors_total") == 0
    assert _sample_total(service, "wildrydes_throttles_total") == 0
    refused = _sample_total(
        service, "wildrydes_batch_write_duration_seconds_count", outcome="error"
    )
    assert refused == 0, "a BatchWriteItem was refused (duplicate keys in one request?)"
    assert _sample_total(service, "wildrydes_records_dead_lettered_total") == 0


# --- 1. per-key order and in-batch de-duplication ------------------------------------------


async def test_later_record_for_a_key_wins_within_and_across_batches(
    resources: Settings, kinesis: Any, dynamodb: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small batches so a key's versions sometimes share a batch and sometimes straddle two;
    # a long window so each batch is filled from what is queued rather than sent early.
    settings = resources.replace(batch_window_seconds=0.2, batch_size=5, writers=4)
    records: list[dict[str, Any]] = []
    filler = 200
    # Adjacent versions of one key: they meet in one batch, where the later must win.
    for minute in range(10):
        for version in range(3):
            records.append(_minute(minute, Distance=100_000 * (version + 1) + minute))
        records.append(_minute(filler))
        filler += 1
    # Versions far apart in the stream: written by successive batches, in stream order.
    for version in range(3):
        for minute in range(20, 60):
            records.append(_minute(minute, Distance=100_000 * (version + 1) + minute))
            if minute % 5 == 0:
                records.append(_minute(filler))
                filler += 1
    expected = {_key(r): str(r["Distance"]) for r in records}  # the last version of each key

    batches: list[dict[ItemKey, int]] = []
    write = BatchWriter.write

    async def spy(self: BatchWriter, batch: Batch) -> None:
        batches.append({key: len(envelopes) for key, envelopes in batch.items()})
        await write(self, batch)

    monkeypatch.setattr(BatchWriter, "write", spy)
    # One partition key: the whole sequence lands on one shard, in this order.
    results = await put_records(kinesis, settings.stream_name, records)
    assert len({r["ShardId"] for r in results}) == 1

    async with Service(settings) as service:
        await service.run_burst()
        written = service.metrics.snapshot().written

    items = await scan_table(dynamodb, settings.table_name)
    assert {_item_key(i): i["Distance"]["N"] for i in items} == expected
    assert written == len(records)  # every record, superseded or not, acknowledged once
    _assert_clean(service, settings)
    # The test did exercise de-duplication: some batch carried one key more than once, yet
    # dynalite (which refuses duplicate keys in one request) refused nothing.
    assert any(count > 1 for batch in batches for count in batch.values())
    assert all(len(batch) <= 5 for batch in batches)
    last = max(int(r["SequenceNumber"]) for r in results)
    assert await _lease_checkpoint(dynamodb, settings, results[0]["ShardId"]) == str(last)


# --- 2. a slow writer holds the checkpoint back ---------------------------------------------


async def test_a_write_finishing_late_holds_the_checkpoint_back_until_it_lands(
    one_shard: Settings,
    kinesis: Any,
    dynamodb: Any,
    monkeypatch: pytest.MonkeyPatch,
    running: list[Service],
) -> None:
    # One item per batch and several writers, so only the chosen record is held up.
    settings = one_shard.replace(batch_size=1, writers=4)
    records = [_minute(m) for m in range(30)]
    held_index = 10
    held_key = _key(records[held_index])
    entered, release = asyncio.Event(), asyncio.Event()
    write = BatchWriter.write

    async def slow_for_one_key(self: BatchWriter, batch: Batch) -> None:
        if held_key in batch:
            entered.set()
            await release.wait()
        await write(self, batch)

    monkeypatch.setattr(BatchWriter, "write", slow_for_one_key)
    results = await put_records(kinesis, settings.stream_name, records)
    shard = results[0]["ShardId"]
    seqs = [int(r["SequenceNumber"]) for r in results]
    at = [position(seq) for seq in seqs]  # what the progress counts in

    service = Service(settings)
    running.append(service)
    await service.start()
    assert service.supervisor is not None
    await asyncio.wait_for(entered.wait(), 30)
    progress = service.supervisor.owned[shard].progress
    earlier = {_key(r) for r in records[:held_index]}
    later = {_key(r) for r in records[held_index + 1 :]}

    async def neighbours_landed() -> bool:
        # Records queued behind the held one on its writer wait too (per-key order); those
        # routed to the other writers get through.
        items = {_item_key(i) for i in await scan_table(dynamodb, settings.table_name)}
        return earlier <= items and bool(later & items)

    # Every earlier record and some later ones are in the table, and acknowledged...
    await wait_for(neighbours_landed)
    await wait_for(holds(lambda: service.metrics.snapshot().written > held_index))
    await wait_for(holds(lambda: (progress.checkpoint or 0) >= at[held_index - 1]))
    # ...yet the checkpoint stops just before the held record, in memory and in the table.
    assert progress.checkpoint == at[held_index - 1]

    async def lease_at_least(value: int) -> bool:
        checkpoint = await _lease_checkpoint(dynamodb, settings, shard)
        return checkpoint is not None and checkpoint.isdigit() and int(checkpoint) >= value

    await wait_for(lambda: lease_at_least(seqs[held_index - 1]))
    assert await _lease_checkpoint(dynamodb, settings, shard) == str(seqs[held_index - 1])
    items = {_item_key(i) for i in await scan_table(dynamodb, settings.table_name)}
    assert held_key not in items
    assert progress.checkpoint == at[held_index - 1]
    assert not progress.drained.is_set()

    release.set()
    await wait_for(lambda: lease_at_least(seqs[-1]))
    assert await _lease_checkpoint(dynamodb, settings, shard) == str(seqs[-1])
    assert progress.checkpoint == at[-1]
    await service.stop()
    items = {_item_key(i) for i in await scan_table(dynamodb, settings.table_name)}
    assert items == {_key(r) for r in records}
    _assert_clean(service, settings)


# --- 3. bad records go to the dead-letter file; the shard moves on --------------------------


async def test_bad_records_are_dead_lettered_and_the_shard_keeps_moving(
    one_shard: Settings, kinesis: Any, dynamodb: Any
) -> None:
    settings = one_shard
    good_before = [_minute(m) for m in range(5)]
    bad: list[tuple[bytes, str]] = [
        (b"this is not json {", "not JSON"),
        (
            json.dumps({k: v for k, v in _minute(100).items() if k != "Name"}).encode(),
            "Name is missing",
        ),
        (json.dumps(_minute(101, StatusTime="yesterday")).encode(), "StatusTime 'yesterday'"),
        (json.dumps(_minute(102, Distance="far")).encode(), "Distance is not a number"),
    ]
    good_after = [_minute(m) for m in range(5, 10)]
    last_bad = (b"\xff\xfe not utf-8", "not JSON")
    payloads: list[bytes | dict[str, Any]] = [
        *good_before,
        *(data for data, _ in bad),
        *good_after,
        last_bad[0],  # the very last record is bad too: the checkpoint must pass it
    ]
    put_at = time.time()
    results = await put_records(kinesis, settings.stream_name, payloads)
    assert len({r["ShardId"] for r in results}) == 1
    shard = results[0]["ShardId"]
    bad_results = [*results[5:9], results[-1]]

    async with Service(settings) as service:
        await service.run_burst()

    items = await scan_table(dynamodb, settings.table_name)
    assert {_item_key(i) for i in items} == {_key(r) for r in good_before + good_after}
    letters = _dead_letters(settings)
    assert len(letters) == len(bad) + 1
    by_sequence = {letter["sequence_number"]: letter for letter in letters}
    for (data, reason), result in zip([*bad, last_bad], bad_results, strict=True):
        letter = by_sequence[result["SequenceNumber"]]
        assert reason in letter["reason"]
        assert letter["kind"] == "invalid_record"
        assert letter["stream"] == settings.stream_name
        assert letter["shard_id"] == shard
        arrival = datetime.fromisoformat(letter["arrival_time"])
        assert arrival.tzinfo is not None
        assert put_at - 5 <= arrival.timestamp() <= time.time() + 5
        assert base64.b64decode(letter["data_base64"]) == data
        assert "data" not in letter  # the payload is stored once, as base64
    assert service.metrics.snapshot().dead_lettered == len(letters)
    last = max(int(r["SequenceNumber"]) for r in results)
    assert await _lease_checkpoint(dynamodb, settings, shard) == str(last)


# --- 4. a split under load: parents before children -----------------------------------------


def _hash_key(partition_key: str) -> int:
    return int(hashlib.md5(partition_key.encode()).hexdigest(), 16)


async def test_split_under_load_reads_the_parent_to_its_end_before_the_children(
    one_shard: Settings,
    kinesis: Any,
    dynamodb: Any,
    monkeypatch: pytest.MonkeyPatch,
    running: list[Service],
    read_mode: ReadMode,
) -> None:
    settings = await read_mode.apply(one_shard.replace(writers=4))
    stream = settings.stream_name
    listed = (await kinesis.list_shards(StreamName=stream))["Shards"]
    assert len(listed) == 1
    parent = listed[0]["ShardId"]
    # Split between the unicorns' hash keys so both children receive records.
    hashes = sorted(_hash_key(name) for name in UNICORNS)
    split_at = hashes[len(hashes) // 2]
    minutes = range(20)
    keys = [(name, minute) for name in UNICORNS for minute in minutes]

    service = Service(settings)
    running.append(service)

    def parent_read_to_end() -> bool:
        owned = service.supervisor.owned.get(parent) if service.supervisor else None
        return owned is None or owned.progress.ended

    # The parent's records are written only once the producer is done and the parent is read
    # to its end: children started early would see their (later) versions overwritten by the
    # parent's, and a SHARD_END checkpointed before the parent's writes finish is caught below.
    produced = asyncio.Event()
    parent_written: set[int] = set()
    write = BatchWriter.write

    async def parent_waits(self: BatchWriter, batch: Batch) -> None:
        envelopes = [e for group in batch.values() for e in group]
        if any(e.shard_id == parent for e in envelopes):
            await produced.wait()
            await wait_for(holds(parent_read_to_end))
        await write(self, batch)
        parent_written.update(e.sequence for e in envelopes if e.shard_id == parent)

    # What was durable when each SHARD_END was stored: (shard, its records written by then).
    shard_ends: list[tuple[str, int]] = []
    checkpoint = LeaseTable.checkpoint

    async def record_shard_end(
        self: LeaseTable, lease: Lease, value: str, state: str | None = None, sub: int = 0
    ) -> None:
        if value == SHARD_END:
            shard_ends.append((lease.shard_id, len(parent_written)))
        await checkpoint(self, lease, value, state, sub)

    monkeypatch.setattr(BatchWriter, "write", parent_waits)
    monkeypatch.setattr(LeaseTable, "checkpoint", record_shard_end)

    put_log: list[tuple[ItemKey, str, str, int]] = []  # key, Distance, shard, sequence

    async def produce() -> None:
        child_rounds = 0
        for round_ in range(200):
            if round_ == 3:
                await kinesis.split_shard(
                    StreamName=stream, ShardToSplit=parent, NewStartingHashKey=str(split_at)
                )
            records = [
                _minute(minute, name, Distance=round_ * 10_000 + minute) for name, minute in keys
            ]
            results = await put_records(kinesis, stream, records)
            for record, result in zip(records, results, strict=True):
                put_log.append(
                    (
                        _key(record),
                        str(record["Distance"]),
                        result["ShardId"],
                        int(result["SequenceNumber"]),
                    )
                )
            if all(r["ShardId"] != parent for r in results):
                child_rounds += 1
                if child_rounds == 2:
                    return
            await asyncio.sleep(0.02)  # pacing: the service reads while we write
        raise AssertionError("the split never took effect")

    await service.start()
    supervisor = service.supervisor
    assert supervisor is not None
    try:
        await asyncio.wait_for(produce(), 30)
    finally:
        produced.set()

    children = sorted({shard for _, _, shard, _ in put_log} - {parent})
    assert len(children) == 2
    last_on = {shard: seq for _, _, shard, seq in put_log}  # put_log is in put order

    async def all_finished() -> bool:
        if ("end", parent) not in supervisor.history:
            return False
        for child in children:
            owned = supervisor.owned.get(child)
            if owned is None or owned.progress.checkpoint != position(last_on[child]):
                return False
        return True

    await wait_for(all_finished, timeout=30)
    await service.stop()

    # Nothing missing, and every key holds its last version: the child's.
    items = await scan_table(dynamodb, settings.table_name)
    final = {key: distance for key, distance, _, _ in put_log}
    assert {_item_key(i): i["Distance"]["N"] for i in items} == final
    on_parent = {key for key, _, shard, _ in put_log if shard == parent}
    on_child = {key: d for key, d, shard, _ in put_log if shard != parent}
    assert len(on_parent) == len(keys)
    assert on_child.keys() == on_parent  # every key was written on the parent, then a child
    assert all(final[key] == distance for key, distance in on_child.items())

    history = supervisor.history
    assert history[0] == ("start", parent)
    parent_end = history.index(("end", parent))
    for child in children:
        assert history.index(("start", child)) > parent_end
    assert await _lease_checkpoint(dynamodb, settings, parent) == SHARD_END
    # No record lost on a crash: SHARD_END was stored only after every parent record was written.
    parent_records = sum(1 for _, _, shard, _ in put_log if shard == parent)
    assert shard_ends == [(parent, parent_records)]
    for child in children:
        assert await _lease_checkpoint(dynamodb, settings, child) == str(last_on[child])
    leases = await LeaseTable(dynamodb, settings.lease_table_name, "test-reader").all()
    for child in children:
        assert leases[child].parents == (parent,)
    _assert_clean(service, settings)


# --- 5. where a shard without a checkpoint starts -------------------------------------------


async def test_latest_skips_records_put_before_start_and_reads_those_after(
    one_shard: Settings, kinesis: Any, dynamodb: Any, running: list[Service]
) -> None:
    settings = one_shard.replace(starting_position="LATEST")
    before = [_minute(m) for m in range(10)]
    after = [_minute(m) for m in range(10, 20)]
    await put_records(kinesis, settings.stream_name, before)

    service = Service(settings)
    running.append(service)
    await service.start()
    supervisor = service.supervisor
    assert supervisor is not None
    (shard,) = supervisor.owned
    poller = supervisor.owned[shard].poller
    # An empty poll happened: the LATEST iterator exists, so what is put now comes after it.
    await asyncio.wait_for(poller.caught_up.wait(), 30)
    results = await put_records(kinesis, settings.stream_name, after)
    await wait_for(holds(lambda: service.metrics.snapshot().written >= len(after)))
    await service.stop()

    items = {_item_key(i) for i in await scan_table(dynamodb, settings.table_name)}
    assert items == {_key(r) for r in after}
    assert service.metrics.snapshot().read == len(after)
    last = max(int(r["SequenceNumber"]) for r in results)
    assert await _lease_checkpoint(dynamodb, settings, shard) == str(last)


async def test_at_timestamp_starts_at_the_given_time(
    one_shard: Settings, kinesis: Any, dynamodb: Any
) -> None:
    before = [_minute(m) for m in range(10)]
    after = [_minute(m) for m in range(10, 20)]
    await put_records(kinesis, one_shard.stream_name, before)
    # A whole second after every `before` arrival (the API's timestamp may be whole seconds);
    # wait for the clock to pass it so every `after` arrival is later.
    start = int(time.time()) + 1
    await asyncio.sleep(max(0.0, start + 0.05 - time.time()))
    assert time.time() > start
    # kinesalite answers AT_TIMESTAMP only when some record is at or after the time: put the
    # later records before starting (real Kinesis would return an iterator at the tip).
    results = await put_records(kinesis, one_shard.stream_name, after)
    settings = one_shard.replace(
        starting_position="AT_TIMESTAMP",
        starting_timestamp=datetime.fromtimestamp(start, UTC).isoformat(),
    )

    async with Service(settings) as service:
        await service.run_burst()

    items = {_item_key(i) for i in await scan_table(dynamodb, settings.table_name)}
    assert items == {_key(r) for r in after}
    assert service.metrics.snapshot().read == len(after)
    shard = results[0]["ShardId"]
    last = max(int(r["SequenceNumber"]) for r in results)
    assert await _lease_checkpoint(dynamodb, settings, shard) == str(last)


# --- 6. our own lease writes never trip over each other -------------------------------------


def _any_lease(_: Lease) -> bool:
    return True


async def test_concurrent_checkpoints_of_one_lease_do_not_look_like_a_lost_lease(
    settings: Settings, dynamodb: Any
) -> None:
    """The checkpointer and a shard reaching its end write the same lease at the same time."""
    leases = LeaseTable(dynamodb, settings.lease_table_name, "me")
    await leases.ensure_table()
    lease = await leases.acquire("shardId-000000000000", (), "TRIM_HORIZON", _any_lease)
    assert lease is not None
    # Both in flight at once: each is conditional on the counter; neither may fail as "lost".
    await asyncio.gather(leases.checkpoint(lease, "100"), leases.checkpoint(lease, SHARD_END))
    await asyncio.gather(leases.checkpoint(lease, "200"), leases.renew(lease))
    stored = await leases.get(lease.shard_id)
    assert stored is not None
    # A prefix checkpoint that queued behind SHARD_END does not move the shard back.
    assert stored.checkpoint == SHARD_END
    assert stored.counter == lease.counter
    await leases.release(lease)
    released = await leases.get(lease.shard_id)
    assert released is not None
    assert released.owner is None


class _SlowAfterWrite:
    """A DynamoDB client whose UpdateItem is applied at once but answers only when let go."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.applied = asyncio.Event()
        self.answer = asyncio.Event()
        self.hold = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def update_item(self, **kwargs: Any) -> Any:
        response = await self._client.update_item(**kwargs)
        if self.hold:
            self.applied.set()
            await self.answer.wait()
        return response


async def test_a_checkpoint_cancelled_in_flight_does_not_lose_the_lease(
    settings: Settings, dynamodb: Any
) -> None:
    """stop() cancels the checkpointer; its write may already be applied in the table."""
    slow = _SlowAfterWrite(dynamodb)
    leases = LeaseTable(slow, settings.lease_table_name, "me")
    await leases.ensure_table()
    lease = await leases.acquire("shardId-000000000000", (), "TRIM_HORIZON", _any_lease)
    assert lease is not None
    task = asyncio.create_task(leases.checkpoint(lease, "100"))
    await asyncio.wait_for(slow.applied.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    slow.hold = False
    slow.answer.set()
    # The final checkpoint and the release that follow a stop still hold the lease.
    await leases.checkpoint(lease, "200")
    await leases.release(lease)
    stored = await leases.get(lease.shard_id)
    assert stored is not None
    assert (stored.checkpoint, stored.owner) == ("200", None)


async def test_a_merge_reads_both_parents_to_their_end_before_the_child(
    settings: Settings,
    kinesis: Any,
    dynamodb: Any,
    running: list[Service],
    read_mode: ReadMode,
) -> None:
    settings = await read_mode.apply(settings)
    await ensure_stream(kinesis, settings.stream_name, 2)
    await ensure_table(dynamodb, settings)
    stream = settings.stream_name
    parents = sorted(s["ShardId"] for s in (await kinesis.list_shards(StreamName=stream))["Shards"])
    service = Service(settings)
    running.append(service)
    await service.start()

    put: list[ItemKey] = []

    async def put_round(minutes: range) -> list[dict[str, Any]]:
        records = [_minute(minute, name) for name in UNICORNS for minute in minutes]
        put.extend(_key(record) for record in records)
        return await put_records(kinesis, stream, records)

    before = await put_round(range(0, 30))
    assert {r["ShardId"] for r in before} == set(parents)  # both parents carry records
    await kinesis.merge_shards(
        StreamName=stream, ShardToMerge=parents[0], AdjacentShardToMerge=parents[1]
    )
    after: list[dict[str, Any]] = []
    for start in range(30, 600, 30):  # until the merge has taken effect
        after = await put_round(range(start, start + 30))
        if not {r["ShardId"] for r in after} & set(parents):
            break
    (child,) = {r["ShardId"] for r in after}

    async def everything_written() -> bool:
        return len(await scan_table(dynamodb, settings.table_name)) == len(set(put))

    await wait_for(everything_written, timeout=30)
    history = service.supervisor.history if service.supervisor else []
    started = history.index(("start", child))
    for parent in parents:
        assert history.index(("end", parent)) < started
    leases = await LeaseTable(dynamodb, settings.lease_table_name, "reader").all()
    assert [leases[parent].checkpoint for parent in parents] == [SHARD_END, SHARD_END]
    assert set(leases[child].parents) == set(parents)


async def test_a_quiet_shard_does_not_look_stale(
    one_shard: Settings, kinesis: Any, running: list[Service]
) -> None:
    await put_records(kinesis, one_shard.stream_name, make_records(10))
    service = Service(one_shard)
    running.append(service)
    await service.start()

    def age() -> float:
        value = service.metrics.registry.get_sample_value(
            "wildrydes_checkpoint_age_seconds", {"shard": "shardId-000000000000"}
        )
        assert value is not None
        return value

    await wait_for(holds(lambda: service.metrics.snapshot().written == 10))
    # Checkpointed everything read, then nothing more arrives: the age stays at 0 however
    # long the shard is quiet (10 checkpoint intervals here).
    await wait_for(holds(lambda: age() < 0.05))
    started = asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - started < 10 * one_shard.checkpoint_interval_seconds:
        assert age() < 0.05
        await asyncio.sleep(one_shard.checkpoint_interval_seconds / 2)
