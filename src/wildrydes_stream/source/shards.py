"""Shard discovery (ListShards, paginated) and lineage: which shards may be read now."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from wildrydes_stream.errors import MissingResourceError


@dataclass(frozen=True, slots=True)
class Shard:
    shard_id: str
    parents: tuple[str, ...]
    closed: bool
    """An ending sequence number is set: the shard was split or merged and takes no writes."""
    hash_range: tuple[str, str] = ("", "")
    """(StartingHashKey, EndingHashKey), written to the lease as KCL does."""


async def list_shards(client: Any, stream_name: str) -> list[Shard]:
    shards: list[Shard] = []
    kwargs: dict[str, Any] = {"StreamName": stream_name}
    while True:
        try:
            response = await client.list_shards(**kwargs)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ResourceNotFoundException":
                raise MissingResourceError(
                    f"Kinesis stream {stream_name!r} does not exist: create it, or set "
                    "stream_name (run) or raw_stream_name (aggregate)"
                ) from None
            raise
        for raw in response.get("Shards", []):
            parents = tuple(
                p for p in (raw.get("ParentShardId"), raw.get("AdjacentParentShardId")) if p
            )
            ending = raw.get("SequenceNumberRange", {}).get("EndingSequenceNumber")
            hashes = raw.get("HashKeyRange", {})
            hash_range = (hashes.get("StartingHashKey", ""), hashes.get("EndingHashKey", ""))
            shards.append(Shard(raw["ShardId"], parents, ending is not None, hash_range))
        token = response.get("NextToken")
        if not token:
            return shards
        kwargs = {"NextToken": token}


def readable_shards(
    shards: list[Shard],
    finished: Collection[str],
    leased: Collection[str] = (),
    *,
    skip_unleased_closed: bool = False,
) -> list[Shard]:
    """Shards to read now: not done themselves, and every parent done.

    Done, as KCL has it: read to the end with SHARD_END checkpointed (`finished`); no longer
    listed (trimmed away with all its data); without a lease while a child has one (KCL deletes
    a finished parent's lease); and with `skip_unleased_closed` (starting at LATEST), closed
    without a lease: its LATEST is its end, so reading it would give nothing.
    """
    listed = {shard.shard_id for shard in shards}
    closed = {shard.shard_id for shard in shards if shard.closed}
    parents_of_leased = {
        parent for shard in shards if shard.shard_id in leased for parent in shard.parents
    }

    def done(shard_id: str) -> bool:
        if shard_id in finished or shard_id not in listed:
            return True
        if shard_id in leased:
            return False
        return shard_id in parents_of_leased or (skip_unleased_closed and shard_id in closed)

    return [
        shard
        for shard in shards
        if not done(shard.shard_id) and all(done(parent) for parent in shard.parents)
    ]


def starting_position(shard: Shard, leased: Collection[str], configured: str) -> str:
    """Where a shard without a lease starts: TRIM_HORIZON after a parent this consumer read
    (its lease exists), so nothing put to the child after the parent's end is skipped;
    otherwise the configured position, as for a shard that has no parents."""
    return "TRIM_HORIZON" if any(parent in leased for parent in shard.parents) else configured
