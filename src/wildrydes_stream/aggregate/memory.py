"""What a window not yet put costs in memory, counted against `max_buffered_bytes`.

A reading gives its record's bytes back to the budget once merged: its window keeps the
aggregate and the reading's StatusTime offset instead. So a window is charged from its first
reading not in an acknowledged put until that put is acknowledged: open windows, windows
waiting for PutRecords and the records queued for them. When windows not yet put fill the
budget the pollers read no more, and a PutRecords outage of any length stops reading instead
of growing memory. Windows already put, kept until the late horizon for late readings and
duplicates, are not charged: they are the fleet's state, set by the fleet and the horizon and
not by how long an outage lasts (charging them would stop a large fleet for good).

The figures were measured with tracemalloc on CPython 3.11; tests/aggregate/test_memory.py
checks that they still cover what windows and their records hold.
"""

from __future__ import annotations

from array import array
from typing import Final

WINDOW_BYTES: Final = 2304
"""A window with one reading: the Window and its Aggregate, the Decimals they keep, its slots in
the unicorn's and the shard's dicts and their keys, its `seen` array (~1.2 KB measured, with
its unicorn's own entry); and the one record a put of it queues (the JSON, the StreamRecord,
the Emission: ~0.65 KB). The rest is room for the arrays' spare capacity and longer numbers."""

RECORD_BYTES: Final = 768
"""A further record of a window whose earlier put is not acknowledged yet (a late reading, or
more readings after the idle timeout put it)."""

NAME_COPIES: Final = 2
"""Copies of the unicorn's name a window's record holds (its JSON and its key), beyond the ones
WINDOW_BYTES counts for a short name."""


def window_bytes(name: str, seen: array[int]) -> int:
    """The charge of a window (and its first record) holding the StatusTimes `seen`."""
    return WINDOW_BYTES + seen.itemsize * len(seen) + NAME_COPIES * len(name)
