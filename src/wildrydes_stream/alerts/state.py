"""Which unicorns are low on magic, per shard, as of any record: the state that moves with a
shard's lease (the core's `ShardState`, consumer/state.py).

Kinesis routes a unicorn's records by its name, so each unicorn lives on one shard and its
state travels with that shard's lease: stored with each checkpoint, restored by the next tenure
(this worker after a restart, another after a hand-off, the children after a reshard: each
takes the unicorns its hash range holds), so an episode already alerted is not alerted again.

Per unicorn: whether it is low, and the newest window (StatusTime) evaluated. Alerts follow
event time, not stream order: a window older than the newest one evaluated (a late reading's
re-put, a throttled put landing after the next minute's) changes nothing, so one dip gives
exactly one `firing` and one `resolved` however its windows arrive.

The state stored with checkpoint C must be the state as of the records up to C, not as of the
last record read (records after C are read again after a restart, and must find the state they
found the first time). So besides the current state each shard keeps the changes since its last
checkpoint, with their sequence numbers, until a checkpoint passes them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, Literal, NamedTuple

from wildrydes_stream.consumer.state import Changes, Entries, StateKey

AlertState = Literal["firing", "resolved"]

PART: Final = "alert"
"""The part of a unicorn's state entry key (its partition key is its name)."""


class Unicorn(NamedTuple):
    """One per window evaluated (every record, on the hot path): a named tuple, built in
    about half the time of a frozen dataclass."""

    low: bool
    newest_ms: int
    """StatusTime of the newest window evaluated."""

    def encode(self) -> dict[str, Any]:
        return {"low": self.low, "t": self.newest_ms}

    @classmethod
    def decode(cls, value: Any) -> Unicorn | None:
        if not isinstance(value, dict):
            return None
        low, newest = value.get("low"), value.get("t")
        if not isinstance(low, bool) or not isinstance(newest, int):
            return None
        return cls(low, newest)


@dataclass(slots=True)
class _Shard:
    base: dict[str, Unicorn] = field(default_factory=dict)
    """As of the last checkpoint's records (or the restored state)."""
    current: dict[str, Unicorn] = field(default_factory=dict)
    """As of the last record evaluated."""
    changes: deque[tuple[int, str, Unicorn]] = field(default_factory=deque)
    """(sequence, unicorn, its state after it) since `base`, in shard order."""
    dirty: set[str] = field(default_factory=set)
    """Unicorns whose `base` changed since the last `changes` call."""

    def fold(self, upto: int | None) -> None:
        changes = self.changes
        while changes and (upto is None or changes[0][0] <= upto):
            _, name, unicorn = changes.popleft()
            self.base[name] = unicorn
            self.dirty.add(name)


class UnicornStates:
    """Per shard: each unicorn's alert state. Implements `ShardState`."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._shards: dict[str, _Shard] = {}
        self.on_forget: Callable[[str], None] | None = None
        """Called with the shard id when a shard is forgotten (its gauges go with it)."""

    def evaluate(
        self, shard_id: str, sequence: int, name: str, magic: int | Decimal | float, time_ms: int
    ) -> AlertState | None:
        """One window's `MinMagicPoints` at StatusTime `time_ms`: `firing` when the unicorn
        falls below the threshold, `resolved` when it is back at or above it, None when
        nothing changed or the window is older than the newest one evaluated."""
        shard = self._shards.get(shard_id)
        if shard is None:
            shard = self._shards[shard_id] = _Shard()
        known = shard.current.get(name)
        if known is not None and time_ms < known.newest_ms:
            return None
        low = magic < self.threshold
        if known is not None and known.low == low and known.newest_ms == time_ms:
            return None
        unicorn = Unicorn(low, time_ms)
        shard.current[name] = unicorn
        shard.changes.append((sequence, name, unicorn))
        if (known is None and not low) or (known is not None and known.low == low):
            return None
        return "firing" if low else "resolved"

    def low(self, shard_id: str) -> set[str]:
        """The unicorns of a shard below the threshold now (for tests and diagnostics)."""
        shard = self._shards.get(shard_id)
        if shard is None:
            return set()
        return {name for name, unicorn in shard.current.items() if unicorn.low}

    # --- ShardState ---------------------------------------------------------------------

    def changes(self, shard_id: str, upto: int | None) -> Changes:
        shard = self._shards.get(shard_id)
        if shard is None:
            return {}
        # Checkpoints only move forward: what they pass is folded into the base for good,
        # so the history stays as short as the records in flight.
        shard.fold(upto)
        changed = {(name, PART): shard.base[name].encode() for name in shard.dirty}
        shard.dirty.clear()
        return changed

    def entries(self, shard_id: str, upto: int | None) -> Entries:
        shard = self._shards.get(shard_id)
        if shard is None:
            return {}
        shard.fold(upto)
        shard.dirty.clear()
        return {(name, PART): unicorn.encode() for name, unicorn in shard.base.items()}

    def restore(self, shard_id: str, parts: Sequence[Mapping[StateKey, Any]]) -> None:
        # After a merge both parents' unicorns (disjoint when every record was routed by its
        # name; a unicorn in both takes the newer state).
        base: dict[str, Unicorn] = {}
        for entries in parts:
            for (name, part), value in entries.items():
                unicorn = Unicorn.decode(value) if part == PART else None
                if unicorn is None:
                    continue  # not ours (another application's state): ignored
                known = base.get(name)
                if known is None or unicorn.newest_ms > known.newest_ms:
                    base[name] = unicorn
        self._shards[shard_id] = _Shard(base=base, current=dict(base))

    def forget(self, shard_id: str) -> None:
        self._shards.pop(shard_id, None)
        if self.on_forget is not None:
            self.on_forget(shard_id)
