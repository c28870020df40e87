"""Application state per shard moves with the lease: saved with each checkpoint in the same
conditional write, restored when the next tenure (this worker or another) starts."""

from __future__ import annotations

import json
from typing import Any

from tests.copy.test_faults import make_records
from tests.helpers import put_records
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.core import Consumer, Sink, Wiring
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.copy.app import TableCopy
from wildrydes_stream.records.envelope import Envelope


class CountingState:
    """Counts the records of each shard up to a sequence: the simplest state with a history."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {}
        self.restored: dict[str, list[bytes]] = {}
        self.base: dict[str, int] = {}

    def note(self, shard_id: str, sequence: int) -> None:
        self.seen.setdefault(shard_id, []).append(sequence)

    def snapshot(self, shard_id: str, upto: int | None) -> bytes | None:
        seen = [s for s in self.seen.get(shard_id, []) if upto is None or s <= upto]
        return json.dumps({"count": self.base.get(shard_id, 0) + len(seen)}).encode()

    def restore(self, shard_id: str, states: list[bytes]) -> None:
        self.restored[shard_id] = states
        self.base[shard_id] = sum(json.loads(s)["count"] for s in states)
        self.seen[shard_id] = []

    def forget(self, shard_id: str) -> None:
        self.seen.pop(shard_id, None)


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
    [lease] = (await LeaseTable(dynamodb, one_shard.lease_table_name, "reader").all()).values()
    assert lease.state is not None
    assert json.loads(lease.state) == {"count": 30}

    await put_records(kinesis, one_shard.stream_name, second)
    counter = await run_once(one_shard.replace(worker_id="another-worker"))

    [(shard, states)] = counter.restored.items()
    assert [json.loads(s) for s in states] == [{"count": 30}]
    [lease] = (await LeaseTable(dynamodb, one_shard.lease_table_name, "reader").all()).values()
    assert lease.state is not None
    assert json.loads(lease.state) == {"count": 50}
    assert lease.shard_id == shard
