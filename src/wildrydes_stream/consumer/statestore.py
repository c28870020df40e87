"""Where a shard's application state lives between tenures: a DynamoDB table beside the leases.

A lease item holds what KCL's holds plus a small reference (`wildrydesStateRef`); the entries
themselves (consumer/state.py) are in the state table, so their size has no 400 KB ceiling and
the lease scan stays small. The state table: partition key `shardId` (S), sort key `part` (S),
one binary attribute `data` (zlib-compressed JSON, at most ~350 KB an item).

Each checkpoint writes a *segment*: the entries that changed since the last checkpoint, split
into as many items as their size needs, and only then makes the conditional lease update that
names it. The reference lists the segments that make up the state, oldest first (later
entries replace earlier ones; a None value deletes). So:

- a checkpoint costs what changed, not the whole fleet's state;
- a segment whose lease update failed (a crash, a lost lease) is never named, so never read;
- once the segments add up to more than a full copy would (or there are too many), the next
  checkpoint writes a full copy instead, and the items it no longer names are deleted.

A segment's id is `<ordinal>-<token>`: the ordinal orders it, the random token keeps two
writers (a zombie and the new owner) from overwriting each other's items.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson

from wildrydes_stream.aws.retry import backoff_delay
from wildrydes_stream.aws.tables import ensure_table
from wildrydes_stream.consumer.state import Changes, Entries, StateKey
from wildrydes_stream.errors import WildrydesError

log = logging.getLogger(__name__)

ITEM_BYTES: Final = 350 * 1024
"""Raw JSON per item before compression: under DynamoDB's 400 KB item limit even if it
does not compress at all."""
MAX_SEGMENTS: Final = 16
"""Segments a reference may name before the next checkpoint writes a full copy."""
BATCH: Final = 25
UNPROCESSED_ATTEMPTS: Final = 20


class StateNotFoundError(WildrydesError):
    """A reference names items that are not in the state table."""


@dataclass(frozen=True, slots=True)
class Segment:
    id: str
    parts: int
    size: int
    """Bytes stored (compressed): what compaction weighs."""


@dataclass(frozen=True, slots=True)
class StateRef:
    segments: tuple[Segment, ...] = ()

    @property
    def ordinal(self) -> int:
        return int(self.segments[-1].id.split("-")[0]) if self.segments else 0

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    def encode(self) -> str:
        return orjson.dumps(
            {"v": 2, "segments": [[s.id, s.parts, s.size] for s in self.segments]}
        ).decode()

    @classmethod
    def decode(cls, text: str | None) -> StateRef | None:
        if not text:
            return None
        value = orjson.loads(text)
        if not isinstance(value, dict) or value.get("v") != 2:
            return None
        return cls(tuple(Segment(str(i), int(p), int(s)) for i, p, s in value["segments"]))


def _chunks(entries: Changes) -> Iterator[bytes]:
    """The entries as compressed JSON items of at most ITEM_BYTES raw each."""
    batch: list[Any] = []
    size = 0
    for (key, part), value in entries.items():
        encoded = orjson.dumps([key, part, value])
        if batch and size + len(encoded) > ITEM_BYTES:
            yield zlib.compress(b"[" + b",".join(batch) + b"]", 1)
            batch, size = [], 0
        batch.append(encoded)
        size += len(encoded) + 1
    if batch:
        yield zlib.compress(b"[" + b",".join(batch) + b"]", 1)


def _entries(data: bytes) -> Iterator[tuple[StateKey, Any]]:
    for key, part, value in orjson.loads(zlib.decompress(data)):
        yield (key, part), value


def _older(segment_id: str, first: Segment | None) -> bool:
    """Whether a segment comes before `first` (None: before everything): a lower ordinal, or
    the same ordinal written by another attempt."""
    if first is None:
        return True
    ordinal = int(segment_id.split("-")[0])
    first_ordinal = int(first.id.split("-")[0])
    return ordinal < first_ordinal or (ordinal == first_ordinal and segment_id != first.id)


class StateStore:
    def __init__(self, client: Any, table_name: str) -> None:
        self._client = client
        self.table_name = table_name

    async def ensure_table(self) -> None:
        """Create the table (on-demand capacity) when missing and wait until it is active."""
        await ensure_table(
            self._client, self.table_name, [("shardId", "HASH"), ("part", "RANGE")], "state table"
        )

    async def load(self, shard_id: str, ref: StateRef | None) -> Entries:
        """The entries a reference names, later segments replacing earlier ones."""
        if ref is None or not ref.segments:
            return {}
        wanted = {s.id: s for s in ref.segments}
        found: dict[str, dict[int, bytes]] = {}
        async for item in self._items(shard_id):
            segment, _, index = item["part"]["S"].partition("/")
            if segment in wanted:
                found.setdefault(segment, {})[int(index)] = item["data"]["B"]
        entries: Entries = {}
        for segment in ref.segments:
            parts = found.get(segment.id, {})
            if len(parts) != segment.parts:
                raise StateNotFoundError(
                    f"state of shard {shard_id} in {self.table_name}: segment {segment.id} "
                    f"has {len(parts)} of {segment.parts} items"
                )
            for index in range(segment.parts):
                for key, value in _entries(parts[index]):
                    if value is None:
                        entries.pop(key, None)
                    else:
                        entries[key] = value
        return entries

    async def write(
        self, shard_id: str, changes: Changes, base: StateRef | None, full: bool = False
    ) -> StateRef:
        """Store `changes` as a new segment after `base`'s (a `full` copy: on its own, though
        numbered after `base`'s, so what it replaces is older by number); the reference to
        commit with the checkpoint."""
        ordinal = (base.ordinal if base is not None else 0) + 1
        segment_id = f"{ordinal:010d}-{secrets.token_hex(4)}"
        items = []
        size = 0
        for index, data in enumerate(_chunks(changes)):
            size += len(data)
            items.append(
                {
                    "shardId": {"S": shard_id},
                    "part": {"S": f"{segment_id}/{index:05d}"},
                    "data": {"B": data},
                }
            )
        await self._put(items)
        segment = Segment(segment_id, len(items), size)
        earlier = base.segments if base is not None and not full else ()
        return StateRef((*earlier, segment))

    def wants_full_copy(self, ref: StateRef | None, pending: int) -> bool:
        """Whether the next checkpoint should write every entry rather than the changes:
        none stored yet, too many segments, or the changes since the first one weigh more
        than it (`pending`: bytes of the changes about to be written, roughly)."""
        if ref is None or not ref.segments:
            return True
        if len(ref.segments) >= MAX_SEGMENTS:
            return True
        first = ref.segments[0].size
        return sum(s.size for s in ref.segments[1:]) + pending > max(first, 64 * 1024)

    async def prune(self, shard_id: str, ref: StateRef | None) -> int:
        """Delete the shard's items older than what `ref` names (the segments a full copy
        replaced, and those of writes never committed); all of them when `ref` is None.
        Returns how many. Never an item newer than `ref`'s first segment: the shard's
        writer may be writing the next segments meanwhile (this or another tenure)."""
        first = ref.segments[0] if ref is not None and ref.segments else None
        stale = [
            part
            async for item in self._items(shard_id, keys_only=True)
            if _older((part := item["part"]["S"]).partition("/")[0], first)
        ]
        deletes = [
            {"DeleteRequest": {"Key": {"shardId": {"S": shard_id}, "part": {"S": part}}}}
            for part in stale
        ]
        await self._batch(deletes)
        return len(stale)

    async def _items(self, shard_id: str, keys_only: bool = False) -> Any:
        params: dict[str, Any] = {
            "TableName": self.table_name,
            "KeyConditionExpression": "shardId = :s",
            "ExpressionAttributeValues": {":s": {"S": shard_id}},
            "ConsistentRead": True,
        }
        if keys_only:
            params["ProjectionExpression"] = "shardId, #p"
            params["ExpressionAttributeNames"] = {"#p": "part"}
        while True:
            page = await self._client.query(**params)
            for item in page.get("Items", []):
                yield item
            last = page.get("LastEvaluatedKey")
            if not last:
                return
            params["ExclusiveStartKey"] = last

    async def _put(self, items: list[dict[str, Any]]) -> None:
        await self._batch([{"PutRequest": {"Item": item}} for item in items])

    async def _batch(self, requests: list[dict[str, Any]]) -> None:
        """BatchWriteItem in batches of 25, unprocessed requests retried with backoff."""
        for start in range(0, len(requests), BATCH):
            batch = requests[start : start + BATCH]
            for attempt in range(1, UNPROCESSED_ATTEMPTS + 1):
                response = await self._client.batch_write_item(
                    RequestItems={self.table_name: batch}
                )
                batch = response.get("UnprocessedItems", {}).get(self.table_name, [])
                if not batch:
                    break
                await asyncio.sleep(backoff_delay(attempt, 0.05, 2.0))
            else:
                raise WildrydesError(
                    f"state table {self.table_name}: {len(batch)} writes still unprocessed"
                )
