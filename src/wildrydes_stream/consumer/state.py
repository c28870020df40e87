"""What an application keeps per shard (open windows, alert states), as the core sees it.

The state of a shard is a map of entries. Each entry is keyed by (partition key, part): the
partition key is the one Kinesis routed the entry's records by (a unicorn's Name), so when a
shard splits or merges, a child takes exactly the entries whose partition key its hash range
holds (the MD5 of the key, read as a 128-bit big-endian integer), and a merge joins two
disjoint maps. Values are JSON values (dicts, lists, strings, numbers), small enough that an
entry never nears DynamoDB's 400 KB item limit.

The core stores the entries with the checkpoint (consumer/statestore.py), writing only the
entries that changed since the last one, and hands them to the next tenure: this worker after
a restart, another after a hand-off, the children after a reshard.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from wildrydes_stream.records.routing import hash_key

StateKey = tuple[str, str]
"""(partition key, part)."""

Entries = dict[StateKey, Any]
Changes = dict[StateKey, Any]
"""Entries changed since the last call; a value of None deletes the entry."""


class ShardState(Protocol):
    """State an application keeps per shard, moving with the shard's lease."""

    def restore(self, shard_id: str, parts: Sequence[Mapping[StateKey, Any]]) -> None:
        """A tenure starts from these entries: its own checkpoint's (one map), or for a child
        shard not yet checkpointed, each parent's entries that its hash range holds (one map a
        parent; disjoint when every record was routed by its partition key). Empty for a
        fresh shard."""
        ...

    def changes(self, shard_id: str, upto: int | None) -> Changes:
        """The entries changed since the last call (or the restore), as of the records up to
        sequence `upto` (every record read when None): stored with the checkpoint at `upto`.
        The caller keeps what it was given until stored, so nothing is given twice."""
        ...

    def entries(self, shard_id: str, upto: int | None) -> Entries:
        """Every entry as of the records up to `upto`: a full copy, when the store compacts.
        Also counts as a `changes` call (what changed is in it)."""
        ...

    def forget(self, shard_id: str) -> None:
        """The tenure ended (lease lost, handed over, shard finished): drop its state."""
        ...


def within(hash_range: tuple[str, str], partition_key: str) -> bool:
    """Whether a shard with this (starting, ending) hash key range receives the key. An
    unknown range (empty strings) holds every key."""
    low, high = hash_range
    if not low or not high:
        return True
    return int(low) <= hash_key(partition_key) <= int(high)


def held_by(hash_range: tuple[str, str], entries: Mapping[StateKey, Any]) -> Entries:
    """The entries whose partition key a shard with `hash_range` receives."""
    cache: dict[str, bool] = {}
    kept: Entries = {}
    for key, value in entries.items():
        name = key[0]
        inside = cache.get(name)
        if inside is None:
            inside = cache[name] = within(hash_range, name)
        if inside:
            kept[key] = value
    return kept
