"""Tumbling event-time windows and the watermark of one shard (no I/O, no clocks).

A window is (Name, start): the readings whose StatusTime falls in [start, start + length). The
shard's watermark is the latest StatusTime read on it minus the allowed lateness; a window is
due once the watermark passes its end. A reading for a window already due is merged and the
window put again (downstream keeps the latest aggregate per key); one more than the late
horizon behind the watermark is refused (dead-lettered by the caller).

The raw stream's checkpoint C may only pass readings whose window was put, and after a restart
every window must come out with the values it would have had. Readings of many windows
interleave in a shard, so a window can hold readings on both sides of C: replaying from C alone
would rebuild it partially. So each window keeps its readings after the last checkpoint one by
one, (sequence, reading), and a `base` aggregate of those at or below it; `snapshot(C)` folds the
readings <= C into the base and stores the bases (and the watermark as of C) with the
checkpoint. A restart loads them and the replayed readings (> C) merge in again.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from decimal import Context, Decimal
from typing import Any

from wildrydes_stream.aggregate.readings import Reading
from wildrydes_stream.records.envelope import Tenure

# Exact for any realistic number of readings: their digits are bounded in readings.py.
_EXACT = Context(prec=200)

WindowKey = tuple[str, int]
"""(Name, window start in epoch ms)."""


@dataclass(slots=True)
class Aggregate:
    distance: Decimal
    min_magic: Decimal
    max_magic: Decimal
    min_health: Decimal
    max_health: Decimal

    @classmethod
    def of(cls, reading: Reading) -> Aggregate:
        m, h = reading.magic, reading.health
        return cls(reading.distance, m, m, h, h)

    def add(self, reading: Reading) -> None:
        self.distance = _EXACT.add(self.distance, reading.distance)
        self.min_magic = min(self.min_magic, reading.magic)
        self.max_magic = max(self.max_magic, reading.magic)
        self.min_health = min(self.min_health, reading.health)
        self.max_health = max(self.max_health, reading.health)

    def merge(self, other: Aggregate) -> None:
        self.distance = _EXACT.add(self.distance, other.distance)
        self.min_magic = min(self.min_magic, other.min_magic)
        self.max_magic = max(self.max_magic, other.max_magic)
        self.min_health = min(self.min_health, other.min_health)
        self.max_health = max(self.max_health, other.max_health)

    def copy(self) -> Aggregate:
        return Aggregate(
            self.distance, self.min_magic, self.max_magic, self.min_health, self.max_health
        )

    def encode(self) -> list[str]:
        return [str(v) for v in self._values()]

    @classmethod
    def decode(cls, values: list[str]) -> Aggregate:
        return cls(*(Decimal(v) for v in values))

    def _values(self) -> tuple[Decimal, ...]:
        return (self.distance, self.min_magic, self.max_magic, self.min_health, self.max_health)


@dataclass(slots=True)
class Window:
    name: str
    start_ms: int
    base: Aggregate | None = None
    """The readings at or below the last checkpoint folded in (see the module doc)."""
    readings: list[tuple[int, Reading]] = field(default_factory=list)
    """Readings after the last checkpoint, in shard order."""
    unsent: list[int] = field(default_factory=list)
    """Sequences of readings not yet in a put of this window: acknowledged once one is."""
    arrival: float = 0.0
    """Kinesis arrival of the oldest unsent reading (for the record age cap)."""
    emitted: bool = False
    """Put at least once (a later put is a re-emission)."""

    def aggregate(self) -> Aggregate:
        total = self.base.copy() if self.base is not None else None
        for _, reading in self.readings:
            if total is None:
                total = Aggregate.of(reading)
            else:
                total.add(reading)
        assert total is not None, "a window always holds a reading"
        return total

    def fold(self, upto: int) -> None:
        cut = 0
        for sequence, reading in self.readings:
            if sequence > upto:
                break
            if self.base is None:
                self.base = Aggregate.of(reading)
            else:
                self.base.add(reading)
            cut += 1
        if cut:
            del self.readings[:cut]


@dataclass(frozen=True, slots=True)
class Emission:
    """A window to put on the output stream; `sequences` are acknowledged once it is."""

    shard_id: str
    name: str
    start_ms: int
    values: Aggregate
    sequences: list[int]
    tenure: Tenure | None
    arrival: float
    again: bool
    """The window was put before (a late reading, a restart, or the idle timeout)."""


@dataclass(frozen=True, slots=True)
class Added:
    late: bool
    """The reading's window was due already when it came."""
    refused: bool
    """More than the late horizon behind the watermark: not merged, dead-letter it."""
    emissions: list[Emission]


class ShardWindows:
    def __init__(self, shard_id: str, window_ms: int, lateness_ms: int, horizon_ms: int) -> None:
        self.shard_id = shard_id
        self._window_ms = window_ms
        self._lateness_ms = lateness_ms
        self._horizon_ms = horizon_ms
        self.windows: dict[WindowKey, Window] = {}
        self.open: dict[WindowKey, Window] = {}
        """Windows holding readings not yet put."""
        self.latest_ms: int | None = None
        """Latest StatusTime read on the shard."""
        self._base_latest_ms: int | None = None
        self._rises: deque[tuple[int, int]] = deque()
        """(sequence, latest_ms) each time a reading after the last checkpoint raised it."""
        self.tenure: Tenure | None = None

    @property
    def watermark_ms(self) -> int | None:
        return None if self.latest_ms is None else self.latest_ms - self._lateness_ms

    def add(self, sequence: int, reading: Reading, arrival: float) -> Added:
        before = self.watermark_ms
        if self.latest_ms is None or reading.time_ms > self.latest_ms:
            self.latest_ms = reading.time_ms
            self._rises.append((sequence, reading.time_ms))
        watermark = self.watermark_ms
        assert watermark is not None
        start = reading.time_ms - reading.time_ms % self._window_ms
        late = start + self._window_ms <= watermark
        if reading.time_ms < watermark - self._horizon_ms:
            return Added(True, True, [])
        key = (reading.name, start)
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = Window(reading.name, start)
        window.readings.append((sequence, reading))
        if not window.unsent:
            window.arrival = arrival
        window.unsent.append(sequence)
        self.open[key] = window
        emissions = [self._emit(window)] if late else []
        # Window ends sit on multiples of the length: only a crossing can make one due.
        w = self._window_ms
        if before is None or watermark // w > before // w:
            emissions += self.due()
        return Added(late, False, emissions)

    def due(self) -> list[Emission]:
        """Put every open window the watermark has passed."""
        watermark = self.watermark_ms
        if watermark is None:
            return []
        ends = self._window_ms
        return [
            self._emit(window)
            for window in list(self.open.values())
            if window.start_ms + ends <= watermark
        ]

    def idle(self, name: str) -> list[Emission]:
        """The unicorn went silent: put its open windows as they are."""
        return [self._emit(w) for w in list(self.open.values()) if w.name == name]

    def has_open(self, name: str) -> bool:
        return any(w.name == name for w in self.open.values())

    def _emit(self, window: Window) -> Emission:
        emission = Emission(
            self.shard_id,
            window.name,
            window.start_ms,
            window.aggregate(),
            window.unsent,
            self.tenure,
            window.arrival,
            window.emitted,
        )
        window.unsent = []
        window.emitted = True
        self.open.pop((window.name, window.start_ms), None)
        return emission

    def snapshot(self, upto: int | None) -> bytes:
        """The windows as of the readings up to `upto` (all when None), for the checkpoint.

        Folds the readings at or below `upto` into the bases first: checkpoints only move
        forward, so no later snapshot needs them one by one. Windows past the horizon with
        nothing after the checkpoint are forgotten here."""
        if upto is not None:
            self._fold(upto)
            latest, windows = (
                self._base_latest_ms,
                [
                    (w.name, w.start_ms, w.emitted, w.base)
                    for w in self.windows.values()
                    if w.base is not None
                ],
            )
        else:
            latest, windows = (
                self.latest_ms,
                [(w.name, w.start_ms, w.emitted, w.aggregate()) for w in self.windows.values()],
            )
        state: dict[str, Any] = {
            "v": 1,
            "latest_ms": latest,
            "windows": [
                [name, start, emitted, aggregate.encode()]
                for name, start, emitted, aggregate in windows
                if aggregate is not None
            ],
        }
        return json.dumps(state, separators=(",", ":")).encode()

    def _fold(self, upto: int) -> None:
        while self._rises and self._rises[0][0] <= upto:
            self._base_latest_ms = self._rises.popleft()[1]
        for window in self.windows.values():
            window.fold(upto)
        if self._base_latest_ms is None:
            return
        # Past the horizon as of the checkpoint: a replay from it would refuse any reading of
        # these windows, so neither memory nor the snapshot needs them.
        oldest = self._base_latest_ms - self._lateness_ms - self._horizon_ms
        for key, window in list(self.windows.items()):
            if window.start_ms + self._window_ms <= oldest and not window.readings:
                del self.windows[key]

    def restore(self, states: list[bytes]) -> None:
        """Load the windows stored with the checkpoint this tenure starts from (or with each
        parent's last one; a merge's two parents are combined)."""
        for raw in states:
            state = json.loads(raw)
            latest = state.get("latest_ms")
            if latest is not None and (self.latest_ms is None or latest > self.latest_ms):
                self.latest_ms = self._base_latest_ms = int(latest)
            for name, start, emitted, values in state.get("windows", []):
                aggregate = Aggregate.decode(values)
                key = (name, int(start))
                window = self.windows.get(key)
                if window is None:
                    self.windows[key] = Window(name, int(start), aggregate, emitted=emitted)
                else:
                    assert window.base is not None
                    window.base.merge(aggregate)
                    window.emitted = window.emitted or emitted
