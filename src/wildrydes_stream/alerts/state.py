"""Which unicorns are low on magic, per shard, as of any record: the state that moves with a
shard's lease (the core's `ShardState`).

Kinesis routes a unicorn's records by its name, so each unicorn lives on one shard and its
state travels with that shard's lease: saved with each checkpoint, restored by the next tenure
(this worker after a restart, or another one after a hand-off), so an episode that is already
alerted is not alerted again. Only the unicorns below the threshold are kept: everything else
is "not low", the state of a unicorn never seen.

The snapshot for checkpoint C must be the state as of the records up to C, not as of the last
record read (records after C are read again after a restart, and must find the state they
found the first time). So besides the current state each shard keeps the transitions since its
last snapshot, with their sequence numbers, until a checkpoint passes them.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

AlertState = Literal["firing", "resolved"]

# Bumped if the stored layout changes; restore ignores states it does not know.
_VERSION = 1


@dataclass(slots=True)
class _Shard:
    base: set[str] = field(default_factory=set)
    """Low unicorns as of the last snapshot (or the restored state)."""
    low: set[str] = field(default_factory=set)
    """Low unicorns as of the last record evaluated."""
    transitions: deque[tuple[int, str, bool]] = field(default_factory=deque)
    """(sequence, unicorn, low after it) since `base`, in shard order."""


class UnicornStates:
    """Per shard: which unicorns are below the threshold. Implements `ShardState`."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._shards: dict[str, _Shard] = {}
        self.on_forget: Callable[[str], None] | None = None
        """Called with the shard id when a shard is forgotten (its gauges go with it)."""

    def evaluate(
        self, shard_id: str, sequence: int, name: str, magic: int | Decimal | float
    ) -> AlertState | None:
        """One record's `MinMagicPoints`: `firing` when the unicorn falls below the threshold,
        `resolved` when it is back at or above it, None when nothing changed."""
        shard = self._shards.get(shard_id)
        if shard is None:
            shard = self._shards[shard_id] = _Shard()
        low = magic < self.threshold
        if low == (name in shard.low):
            return None
        if low:
            shard.low.add(name)
        else:
            shard.low.discard(name)
        shard.transitions.append((sequence, name, low))
        return "firing" if low else "resolved"

    def low(self, shard_id: str) -> set[str]:
        """The unicorns of a shard below the threshold now (for tests and diagnostics)."""
        shard = self._shards.get(shard_id)
        return set(shard.low) if shard is not None else set()

    # --- ShardState ---------------------------------------------------------------------

    def snapshot(self, shard_id: str, upto: int | None) -> bytes | None:
        shard = self._shards.get(shard_id)
        if shard is None:
            return _dump(set())
        if upto is None:
            return _dump(shard.low)
        # Checkpoints only move forward: the transitions up to this one are folded into the
        # base for good, so the history stays as short as the records in flight.
        transitions = shard.transitions
        while transitions and transitions[0][0] <= upto:
            _, name, low = transitions.popleft()
            if low:
                shard.base.add(name)
            else:
                shard.base.discard(name)
        return _dump(shard.base)

    def restore(self, shard_id: str, states: list[bytes]) -> None:
        # A child after a merge inherits both parents' low unicorns; after a split, each child
        # inherits all of them (one of the children will see each unicorn again).
        low: set[str] = set()
        for state in states:
            low |= _load(state)
        self._shards[shard_id] = _Shard(base=set(low), low=set(low))

    def forget(self, shard_id: str) -> None:
        self._shards.pop(shard_id, None)
        if self.on_forget is not None:
            self.on_forget(shard_id)


def _dump(low: set[str]) -> bytes:
    return json.dumps({"v": _VERSION, "low": sorted(low)}, separators=(",", ":")).encode()


def _load(state: bytes) -> set[str]:
    try:
        value = json.loads(state)
    except ValueError:
        return set()  # not ours (another application's state): start from nothing
    if not isinstance(value, dict) or value.get("v") != _VERSION:
        return set()
    return {name for name in value.get("low", []) if isinstance(name, str)}
