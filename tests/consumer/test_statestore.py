"""The state table: segments written before the lease names them, full copies numbered after
what they replace, and pruning that never touches a segment being written meanwhile."""

from __future__ import annotations

import os
from typing import Any

from wildrydes_stream.consumer.statestore import MAX_SEGMENTS, StateRef, StateStore


async def _store(dynamodb: Any) -> StateStore:
    store = StateStore(dynamodb, f"state-{os.getpid()}-{id(dynamodb)}-{os.urandom(3).hex()}")
    await store.ensure_table()
    return store


async def _parts(store: StateStore, shard: str) -> set[str]:
    return {item["part"]["S"].partition("/")[0] async for item in store._items(shard, True)}


async def test_segments_replay_in_order_and_a_full_copy_replaces_them(dynamodb: Any) -> None:
    store = await _store(dynamodb)
    ref = await store.write("s", {("a", "x"): 1, ("b", "x"): 2}, None, full=True)
    ref = await store.write("s", {("a", "x"): 3, ("b", "x"): None}, ref)
    assert await store.load("s", ref) == {("a", "x"): 3}
    # A write never committed (the lease update failed) is never read.
    await store.write("s", {("c", "x"): 9}, ref)
    assert await store.load("s", ref) == {("a", "x"): 3}

    full = await store.write("s", await store.load("s", ref), ref, full=True)
    assert full.ordinal == ref.ordinal + 1
    assert len(full.segments) == 1
    # Written meanwhile by the shard's writer, not yet committed: pruning leaves it alone.
    after = await store.write("s", {("d", "x"): 4}, full)
    removed = await store.prune("s", full)
    assert removed == 3  # the two replaced segments and the uncommitted write
    assert await _parts(store, "s") == {s.id for s in after.segments}
    assert await store.load("s", after) == {("a", "x"): 3, ("d", "x"): 4}


async def test_large_state_spans_items_and_compacts_when_the_changes_outweigh_it(
    dynamodb: Any,
) -> None:
    store = await _store(dynamodb)
    entries = {
        (f"unicorn-{i:05d}", f"w:{m}"): [str(i), list(range(60))]
        for i in range(3000)
        for m in range(3)
    }
    ref = await store.write("big", entries, None, full=True)
    assert ref.segments[0].parts > 1  # more than one ~350 KB item
    assert await store.load("big", ref) == entries
    assert not store.wants_full_copy(ref, 0)
    for _ in range(MAX_SEGMENTS - 1):
        ref = await store.write("big", {("unicorn-00000", "w:0"): ["x", []]}, ref)
    assert store.wants_full_copy(ref, 0)
    assert (await store.load("big", ref))[("unicorn-00000", "w:0")] == ["x", []]
    assert StateRef.decode(ref.encode()) == ref
