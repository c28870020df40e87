"""Tumbling event-time windows of one shard, each unicorn on its own clock (no I/O, no timers).

A window is (Name, start): the readings whose StatusTime falls in [start, start + length).

**Event time per unicorn.** Each unicorn has its own watermark: the latest StatusTime it sent,
less the allowed lateness. Its window is put once its own watermark passes the window's end.
One unicorn's clock, ahead or behind, never moves another's windows: a unicorn two hours ahead
puts its own windows two hours early, and nobody else's. A reading more than the late horizon
behind its own unicorn's watermark is refused (dead-lettered by the caller): so a unicorn whose
clock jumps ahead and back refuses its own readings until they catch up, and only its own.

**Counted once.** A reading with the same Name and StatusTime as one already in its window is a
duplicate (a producer's retry after a timeout puts the same reading twice under two sequence
numbers): it is not counted again. Each window keeps the StatusTimes it holds (as offsets in
the window, 4 bytes each) for exactly this.

**Exact across restarts.** A reading is done once merged: the state stored with a checkpoint is
every window (its aggregate and StatusTimes) and every unicorn's latest StatusTime, as of the
moment the checkpoint is written, which is at or after the checkpoint's records. After a
restart the records after the checkpoint are read again, and those already merged are
duplicates by the rule above: every window comes out as its readings give it, once each. A
window whose put is not acknowledged yet is stored as `unput`, and put again after a restart.

Windows more than the late horizon behind their unicorn's watermark are forgotten (a later
reading for them would be refused anyway).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Context, Decimal
from typing import Any

from wildrydes_stream.aggregate.readings import Reading
from wildrydes_stream.consumer.state import Changes, Entries, StateKey

# Exact for any realistic number of readings: their digits are bounded in readings.py.
_EXACT = Context(prec=200)

UNICORN = "u"
"""The part of a unicorn's own entry (its latest StatusTime)."""
WINDOW = "w:"
"""Prefix of a window's entry part, followed by its start in epoch ms."""


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
    values: Aggregate
    seen: array[int] = field(default_factory=lambda: array("l"))
    """StatusTimes merged, as ms offsets from the start (duplicates are refused by these)."""
    version: int = 0
    """Bumped by every reading merged."""
    put_version: int = 0
    """The version the last acknowledged put carried: the window is unput while below."""
    emitted: bool = False
    """Put at least once (a later put is a re-emission)."""
    arrival: float = 0.0
    """Kinesis arrival of the oldest reading not yet in a put (for the record age cap)."""

    @property
    def unput(self) -> bool:
        return self.put_version < self.version

    def encode(self) -> list[Any]:
        return [self.values.encode(), list(self.seen), self.emitted, self.unput]


@dataclass(slots=True)
class Unicorn:
    latest_ms: int
    windows: dict[int, Window] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Emission:
    """A window to put on the output stream, as it was when emitted."""

    shard_id: str
    name: str
    start_ms: int
    values: Aggregate
    version: int
    arrival: float
    again: bool
    """The window was put before (a late reading, a restart, or the idle timeout)."""


@dataclass(frozen=True, slots=True)
class Added:
    late: bool = False
    """The reading's window was due already when it came."""
    refused: bool = False
    """More than the late horizon behind its unicorn's watermark: dead-letter it."""
    duplicate: bool = False
    """Its window holds a reading with the same StatusTime: not counted again."""
    emissions: list[Emission] = field(default_factory=list)


class ShardWindows:
    def __init__(self, shard_id: str, window_ms: int, lateness_ms: int, horizon_ms: int) -> None:
        self.shard_id = shard_id
        self._window_ms = window_ms
        self._lateness_ms = lateness_ms
        self._horizon_ms = horizon_ms
        self.unicorns: dict[str, Unicorn] = {}
        self.open: dict[tuple[str, int], Window] = {}
        """Windows holding readings not in any put yet, waiting for their end to be due."""
        self._dirty_unicorns: set[str] = set()
        """Unicorns whose latest StatusTime changed since the last `changes`."""
        self._dirty_windows: set[tuple[str, int]] = set()
        """(Name, start) of windows changed (or forgotten) since the last `changes`."""

    @property
    def watermark_ms(self) -> int | None:
        """The furthest any unicorn's watermark has come (for the metrics)."""
        if not self.unicorns:
            return None
        return max(u.latest_ms for u in self.unicorns.values()) - self._lateness_ms

    def add(self, reading: Reading, arrival: float) -> Added:
        name, time_ms, length = reading.name, reading.time_ms, self._window_ms
        start = time_ms - time_ms % length
        unicorn = self.unicorns.get(name)
        if unicorn is None:
            unicorn = self.unicorns[name] = Unicorn(time_ms)
            self._dirty_unicorns.add(name)
        window = unicorn.windows.get(start)
        offset = time_ms - start
        if window is not None and offset in window.seen:
            return Added(duplicate=True)
        before = unicorn.latest_ms - self._lateness_ms
        if time_ms < before - self._horizon_ms:
            return Added(late=True, refused=True)
        if time_ms > unicorn.latest_ms:
            unicorn.latest_ms = time_ms
            self._dirty_unicorns.add(name)
        if window is None:
            window = unicorn.windows[start] = Window(name, start, Aggregate.of(reading))
        else:
            window.values.add(reading)
        window.seen.append(offset)
        if not window.unput:
            window.arrival = arrival  # the oldest reading not in a put yet
        window.version += 1
        self._dirty_windows.add((name, start))
        watermark = unicorn.latest_ms - self._lateness_ms
        late = start + length <= watermark
        emissions: list[Emission] = []
        if late:
            emissions.append(self._emit(window))
        else:
            self.open[(name, start)] = window
        # Window ends sit on multiples of the length: only a crossing can make one due.
        if watermark // length > before // length:
            emissions += self._due(unicorn, watermark)
            self._expire(unicorn, watermark)
        return Added(late=late, emissions=emissions)

    def _due(self, unicorn: Unicorn, watermark: int) -> list[Emission]:
        length = self._window_ms
        return [
            self._emit(window)
            for start, window in list(unicorn.windows.items())
            if start + length <= watermark and (window.name, start) in self.open
        ]

    def _expire(self, unicorn: Unicorn, watermark: int) -> None:
        """Forget windows past the horizon: a reading for them would be refused."""
        oldest = watermark - self._horizon_ms
        for start, window in list(unicorn.windows.items()):
            if start + self._window_ms <= oldest and not window.unput:
                del unicorn.windows[start]
                self._dirty_windows.add((window.name, start))

    def idle(self, name: str) -> list[Emission]:
        """The unicorn went silent: put its open windows as they are."""
        unicorn = self.unicorns.get(name)
        if unicorn is None:
            return []
        return [
            self._emit(window)
            for start, window in list(unicorn.windows.items())
            if (name, start) in self.open
        ]

    def _emit(self, window: Window) -> Emission:
        self.open.pop((window.name, window.start_ms), None)
        emission = Emission(
            self.shard_id,
            window.name,
            window.start_ms,
            window.values.copy(),
            window.version,
            window.arrival,
            window.emitted,
        )
        window.emitted = True
        return emission

    def acknowledged(self, name: str, start_ms: int, version: int) -> None:
        """A put of the window at `version` is on the stream."""
        unicorn = self.unicorns.get(name)
        window = unicorn.windows.get(start_ms) if unicorn is not None else None
        if window is None or version <= window.put_version:
            return
        window.put_version = version
        self._dirty_windows.add((name, start_ms))

    # --- state --------------------------------------------------------------------------

    def changes(self) -> Changes:
        changed: Changes = {}
        for name in self._dirty_unicorns:
            unicorn = self.unicorns.get(name)
            changed[name, UNICORN] = None if unicorn is None else unicorn.latest_ms
        for name, start in self._dirty_windows:
            unicorn = self.unicorns.get(name)
            window = unicorn.windows.get(start) if unicorn is not None else None
            changed[name, f"{WINDOW}{start}"] = None if window is None else window.encode()
        self._dirty_unicorns.clear()
        self._dirty_windows.clear()
        return changed

    def entries(self) -> Entries:
        self._dirty_unicorns.clear()
        self._dirty_windows.clear()
        return dict(self._all())

    def _all(self) -> Iterator[tuple[StateKey, Any]]:
        for name, unicorn in self.unicorns.items():
            yield (name, UNICORN), unicorn.latest_ms
            for start, window in unicorn.windows.items():
                yield (name, f"{WINDOW}{start}"), window.encode()

    def restore(self, parts: Sequence[Mapping[StateKey, Any]]) -> list[Emission]:
        """Load the stored windows (a merge's two parents are combined); returns the windows
        whose put was not acknowledged and whose unicorn's watermark has passed them: they
        are put again now. Unput windows not yet due are open again."""
        for entries in parts:
            for (name, part), value in entries.items():
                if part == UNICORN and isinstance(value, int):
                    unicorn = self.unicorns.get(name)
                    if unicorn is None:
                        self.unicorns[name] = Unicorn(value)
                    else:
                        unicorn.latest_ms = max(unicorn.latest_ms, value)
        # In event-time order, whatever order the entries are stored in: a unicorn's windows
        # are put (here, when due later, when idle) in the order they are held, and `run`'s
        # alerts ignore a window older than one already seen.
        stored = [
            (int(part.removeprefix(WINDOW)), name, value)
            for entries in parts
            for (name, part), value in entries.items()
            if part.startswith(WINDOW)
        ]
        stored.sort(key=lambda window: window[0])
        for start, name, value in stored:
            self._restore_window(name, start, value)
        emissions: list[Emission] = []
        for (name, start), window in list(self.open.items()):
            watermark = self.unicorns[name].latest_ms - self._lateness_ms
            if start + self._window_ms <= watermark:
                emissions.append(self._emit(window))
        return emissions

    def _restore_window(self, name: str, start: int, value: Any) -> None:
        values, seen, emitted, unput = value
        unicorn = self.unicorns.setdefault(name, Unicorn(start))
        window = Window(name, start, Aggregate.decode(values), array("l", seen))
        window.emitted, window.version = bool(emitted), 1
        window.put_version = 0 if unput else 1
        known = unicorn.windows.get(start)
        if known is not None:
            # The same window on both sides of a merge (its readings were not all routed by
            # the unicorn's name): combine what does not overlap, keep the larger otherwise.
            if set(known.seen).isdisjoint(window.seen):
                known.values.merge(window.values)
                known.seen.extend(window.seen)
                known.put_version = 0
                window = known
            elif len(window.seen) <= len(known.seen):
                return
        unicorn.windows[start] = window
        if window.unput:
            self.open[(name, start)] = window
