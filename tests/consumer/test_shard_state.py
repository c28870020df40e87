"""Application state per shard moves with the lease: saved with each checkpoint in the same
conditional write, restored when the next tenure (this worker or another) starts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tests.copy.test_faults import make_records
from tests.helpers import put_records
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.core import Consumer, Sink, Wiring
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.consumer.state import Changes, Entries, StateKey
from wildrydes_stream.consumer.statestore import StateRef, StateStore
from wildrydes_stream.copy.app import TableCopy
from wildrydes_stream.records.envelope import Envelope


class CountingState:
    """Counts the records of each shard up to a sequence: the simplest state with a history."""

    KEY = ("all", "count")

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {}
        self.restored: dict[str, Sequence[Mapping[StateKey, Any]]] = {}
        self.base: dict[str, int] = {}

    def note(self, shard_id: str, sequence: int) -> None:
        self.seen.setdefault(shard_id, []).append(sequence)

    def changes(self, shard_id: str, upto: int | None) -> Changes:
        return self.entries(shard_id, upto)

    def entries(self, shard_id: str, upto: int | None) -> Entries:
        seen = [s for s in self.seen.get(shard_id, []) if upto is None or s <= upto]
        return {self.KEY: self.base.get(shard_id, 0) + len(seen)}

    def restore(self, shard_id: str, parts: Sequence[Mapping[StateKey, Any]]) -> None:
        self.restored[shard_id] = parts
        self.base[shard_id] = sum(part[self.KEY] for part in parts if self.KEY in part)
        self.seen[shard_id] = []

    def forget(self, shard_id: str) -> None:
        self.seen.pop(shard_id, None)


async def stored(dynamodb: Any, settings: Settings) -> tuple[str, Entries]:
    """The one lease's shard and the state its checkpoint names."""
    [lease] = (await LeaseTable(dynamodb, settings.lease_table_name, "reader").all()).values()
    store = StateStore(dynamodb, settings.state_table_name)
    return lease.shard_id, await store.load(lease.shard_id, StateRef.decode(lease.state_ref))


class CountingSink:
    """The table copy's sink, counting each record as the poller hands it over."""

    def __init__(self, pool: Sink, counter: CountingState) -> None:
        self._pool = pool
        self._counter = counter

    def start(self) -> None:
        self._pool.start()

    async def put_many(self, envelopes: list[Envelope]) -> None:
        for envelope in envelopes:
            self._counter.note(envelope.shard_id, envelope.sequence)
        await self._pool.put_many(envelopes)

    async def drain(self) -> None:
        await self._pool.drain()

    async def stop(self) -> None:
        await self._pool.stop()


class CountingCopy(TableCopy):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.counter = CountingState()
        self.state = self.counter

    def sink(self, wiring: Wiring) -> CountingSink:  # type: ignore[override]
        return CountingSink(super().sink(wiring), self.counter)


async def run_once(settings: Settings) -> CountingState:
    app = CountingCopy(settings)
    async with Consumer(settings, app) as consumer:
        await consumer.run_burst()
    return app.counter


async def test_state_is_saved_with_the_checkpoint_and_restored_by_the_next_owner(
    one_shard: Settings, kinesis: Any, dynamodb: Any
) -> None:
    first, second = make_records(30), make_records(50)[30:]
    await put_records(kinesis, one_shard.stream_name, first)
    await run_once(one_shard)
    _, entries = await stored(dynamodb, one_shard)
    assert entries == {CountingState.KEY: 30}

    await put_records(kinesis, one_shard.stream_name, second)
    counter = await run_once(one_shard.replace(worker_id="another-worker"))

    [(shard, parts)] = counter.restored.items()
    assert parts == [{CountingState.KEY: 30}]
    stored_shard, entries = await stored(dynamodb, one_shard)
    assert entries == {CountingState.KEY: 50}
    assert stored_shard == shard
