"""One take of a shard's lease: its progress, its poller, and its application state on the way
to the state store.

The state a tenure checkpoints is written in two steps (consumer/statestore.py): the changed
entries go to the state table as a new segment, then the conditional lease update names it.
`TenureState` keeps the changes not yet named by a committed checkpoint, so a checkpoint that
fails (throttled, timed out) loses nothing: the next one writes them again, with whatever
changed since.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wildrydes_stream.consumer.lease import Lease
from wildrydes_stream.consumer.progress import ShardProgress
from wildrydes_stream.consumer.state import Changes, ShardState, StateKey, held_by
from wildrydes_stream.consumer.statestore import StateRef, StateStore
from wildrydes_stream.source.fanout import ShardSubscriber
from wildrydes_stream.source.poller import ShardPoller

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Inheritance:
    """Where a tenure's state comes from: its own lease's last checkpoint, or (a child shard
    not yet checkpointed) its parents' last ones, filtered to its hash range."""

    own: StateRef | None
    parents: tuple[tuple[str, StateRef | None], ...] = ()
    hash_range: tuple[str, str] = ("", "")


class TenureState:
    def __init__(self, shard_id: str, state: ShardState, store: StateStore) -> None:
        self.shard_id = shard_id
        self._state = state
        self._store = store
        self.ref: StateRef | None = None
        """What the last committed checkpoint names."""
        self._pending: Changes = {}
        self._prepared: tuple[StateRef, bool] | None = None

    async def restore(self, inheritance: Inheritance) -> None:
        """Load what this tenure starts from and hand it to the application."""
        if inheritance.own is not None or not inheritance.parents:
            own = await self._store.load(self.shard_id, inheritance.own)
            self.ref = inheritance.own
            self._state.restore(self.shard_id, [own])
            return
        parts: list[Mapping[StateKey, Any]] = []
        for parent_id, ref in inheritance.parents:
            entries = await self._store.load(parent_id, ref)
            parts.append(held_by(inheritance.hash_range, entries))
        self._state.restore(self.shard_id, parts)
        # Nothing of this shard is stored yet: its first checkpoint writes a full copy.
        self.ref = None

    async def prepare(self, upto: int | None) -> str:
        """Write the state as of `upto` to the state table; the reference to commit."""
        store, state = self._store, self._state
        if store.wants_full_copy(self.ref, 0):
            entries = state.entries(self.shard_id, upto)
            self._pending.clear()
            # Kept as the pending changes too: if the commit fails, the next try has them.
            self._pending.update(entries)
            ref = await store.write(self.shard_id, entries, self.ref, full=True)
            self._prepared = (ref, True)
            return ref.encode()
        self._pending.update(state.changes(self.shard_id, upto))
        if not self._pending and self.ref is not None:
            self._prepared = (self.ref, False)
            return self.ref.encode()
        ref = await store.write(self.shard_id, self._pending, self.ref)
        self._prepared = (ref, False)
        return ref.encode()

    def committed(self) -> StateRef | None:
        """The prepared reference is now the lease's; returns the one it replaced when that
        was a full copy (its items, and any never committed, may go)."""
        if self._prepared is None:
            return None
        ref, full = self._prepared
        self._prepared = None
        self.ref = ref
        self._pending.clear()
        return ref if full else None

    def forget(self) -> None:
        self._state.forget(self.shard_id)


@dataclass(eq=False)
class OwnedShard:
    lease: Lease
    progress: ShardProgress
    poller: ShardPoller | ShardSubscriber
    """The shard's reader: polling or, in read_mode `fanout`, subscription."""
    state: TenureState | None = None
    inheritance: Inheritance = field(default_factory=lambda: Inheritance(None))
    task: asyncio.Task[None] | None = None
    checkpointed_at: float = field(default_factory=time.monotonic)
    watchdog: asyncio.TimerHandle | None = None
    """Fires when the lease has gone lease_duration_seconds without a confirmed write."""
    handing_off: bool = False
    """Handing the lease to another worker (KCL 3's checkpointOwner protocol)."""
    hand_off: asyncio.Task[None] | None = None
    checkpointing: asyncio.Lock = field(default_factory=asyncio.Lock)
    """One checkpoint at a time: the state's pending changes belong to one write."""
    restored: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the application's state is loaded (or there is none to load)."""

    @property
    def shard_id(self) -> str:
        return self.lease.shard_id
