"""Packing readings into KPL aggregates, as the Kinesis Producer Library does (`produce --kpl`).

The KPL only packs user records bound for the same shard, from its map of the stream's shards:
the aggregate goes where its first record's key hashes and every record in it belongs there.
Here the map is ListShards once at start (a reshard meanwhile makes some records land on a
shard that does not hold their key, as with the KPL; consumers count them). The aggregate's
partition key is its first reading's name, with an explicit hash key inside the shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wildrydes_stream.produce.model import Reading
from wildrydes_stream.records.kpl import UserRecord, aggregate
from wildrydes_stream.records.routing import hash_key


@dataclass(frozen=True, slots=True)
class Packed:
    """One Kinesis record holding `readings`."""

    readings: tuple[Reading, ...]
    data: bytes
    partition_key: str
    explicit_hash_key: str

    def entry(self) -> dict[str, Any]:
        return {
            "Data": self.data,
            "PartitionKey": self.partition_key,
            "ExplicitHashKey": self.explicit_hash_key,
        }


class ShardMap:
    def __init__(self, starting_hash_keys: Sequence[int]) -> None:
        self._starts = sorted(starting_hash_keys)

    @classmethod
    async def of(cls, kinesis: Any, stream: str) -> ShardMap:
        """The open shards' hash key ranges (closed ones take no more records)."""
        starts: list[int] = []
        params: dict[str, Any] = {"StreamName": stream}
        while True:
            page = await kinesis.list_shards(**params)
            for shard in page["Shards"]:
                if "EndingSequenceNumber" not in shard.get("SequenceNumberRange", {}):
                    starts.append(int(shard["HashKeyRange"]["StartingHashKey"]))
            token = page.get("NextToken")
            if not token:
                return cls(starts or [0])
            params = {"NextToken": token}

    def shard_of(self, key: int) -> int:
        """The index of the shard whose range holds `key` (the last start at or below it)."""
        low, high = 0, len(self._starts)
        while high - low > 1:
            middle = (low + high) // 2
            if self._starts[middle] <= key:
                low = middle
            else:
                high = middle
        return low


def pack(readings: Sequence[Reading], per_record: int, shards: ShardMap) -> list[Packed]:
    """Readings in aggregates of at most `per_record`, each holding one shard's readings."""
    by_shard: dict[int, list[tuple[int, Reading]]] = {}
    for reading in readings:
        key = hash_key(reading.name)
        by_shard.setdefault(shards.shard_of(key), []).append((key, reading))
    packed: list[Packed] = []
    for group in by_shard.values():
        for first in range(0, len(group), per_record):
            chunk = group[first : first + per_record]
            users = [UserRecord(r.name, None, r.encode()) for _, r in chunk]
            packed.append(
                Packed(
                    tuple(r for _, r in chunk),
                    aggregate(users),
                    chunk[0][1].name,
                    str(chunk[0][0]),
                )
            )
    return packed
