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


async def list_shards(client: Any, stream_name: str) -> list[Shard]:
    shards: list[Shard] = []
    kwargs: dict[str, Any] = {"StreamName": stream_name}
    while True:
        try:
            response = await client.list_shards(**kwargs)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ResourceNotFoundException":
                raise MissingResourceError(
                    f"Kinesis stream {stream_name!r} does not exist (setting stream_name)"
                ) from None
            raise
        for raw in response.get("Shards", []):
            parents = tuple(
                p for p in (raw.get("ParentShardId"), raw.get("AdjacentParentShardId")) if p
            )
            ending = raw.get("SequenceNumberRange", {}).get("EndingSequenceNumber")
            shards.append(Shard(raw["ShardId"], parents, ending is not None))
        token = response.get("NextToken")
        if not token:
            return shards
        kwargs = {"NextToken": token}


def readable_shards(shards: list[Shard], finished: Collection[str]) -> list[Shard]:
    """Shards whose parents are done: read to the end with SHARD_END checkpointed (`finished`).

    A parent no longer listed has been trimmed away with all its data, so it is done too.
    Shards already at SHARD_END are not returned.
    """
    listed = {shard.shard_id for shard in shards}
    return [
        shard
        for shard in shards
        if shard.shard_id not in finished
        and all(parent in finished or parent not in listed for parent in shard.parents)
    ]
