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

**Charged while unput.** Given the service's byte budget, a window is counted in it from its
first reading not in an acknowledged put until that put (memory.py): the pollers pause when
windows waiting for PutRecords fill it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Context, Decimal
from typing import Any, Final

from wildrydes_stream.aggregate.memory import RECORD_BYTES, window_bytes
from wildrydes_stream.aggregate.readings import Number, Reading
from wildrydes_stream.consumer.state import Changes, Entries, StateKey
from wildrydes_stream.runtime.budget import ByteBudget

# Exact for any realistic number of readings: their digits are bounded in readings.py.
_EXACT = Context(prec=200)

UNICORN = "u"
"""The part of a unicorn's own entry (its latest StatusTime)."""
WINDOW = "w:"
"""Prefix of a window's entry part, followed by its start in epoch ms."""


@dataclass(slots=True)
class Aggregate:
    distance: Number
    min_magic: Number
    max_magic: Number
    min_health: Number
    max_health: Number

    @classmethod
    def of(cls, reading: Reading) -> Aggregate:
        m, h = reading.magic, reading.health
        return cls(reading.distance, m, m, h, h)

    def add(self, reading: Reading) -> None:
        # Whole numbers (every reading the workshop producer sends) add as ints; a Decimal on
        # either side makes the sum an exact Decimal.
        distance, total = reading.distance, self.distance
        if type(distance) is int and type(total) is int:
            self.distance = total + distance
        else:
            self.distance = _EXACT.add(total, distance)
        magic, health = reading.magic, reading.health
        if magic < self.min_magic:
            self.min_magic = magic
        if magic > self.max_magic:
            self.max_magic = magic
        if health < self.min_health:
            self.min_health = health
        if health > self.max_health:
            self.max_health = health

    def merge(self, other: Aggregate) -> None:
        total, distance = self.distance, other.distance
        if type(distance) is int and type(total) is int:
            self.distance = total + distance
        else:
            self.distance = _EXACT.add(total, distance)
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
        return cls(*(_number(v) for v in values))

    def _values(self) -> tuple[Number, ...]:
        return (self.distance, self.min_magic, self.max_magic, self.min_health, self.max_health)


def _number(text: str) -> Number:
    """A stored value: an int where it is one (as the readings give them), else Decimal."""
    digits = text[1:] if text.startswith("-") else text
    if digits.isdigit() and digits.isascii():
        return int(text)
    return Decimal(text)


@dataclass(slots=True)
class Window:
    name: str
    start_ms: int
    values: Aggregate
    seen: array[int] = field(default_factory=lambda: array("i"))
    """StatusTimes merged, as ms offsets from the start (duplicates are refused by these;
    4 bytes each: an offset is below the longest window, an hour)."""
    version: int = 0
    """Bumped by every reading merged."""
    put_version: int = 0
    """The version the last acknowledged put carried: the window is unput while below."""
    emitted: bool = False
    """Put at least once (a later put is a re-emission)."""
    arrival: float = 0.0
    """Kinesis arrival of the oldest reading not yet in a put (for the record age cap)."""
    held: int = 0
    """Bytes counted in the byte budget for it (and its queued records) until it is put."""
    queued: bool = False
    """A record of it is queued since it was last put: a further one is charged too."""
    key: tuple[str, int] = field(init=False)
    """(Name, start): made once, for the open and changed sets every reading touches."""

    def __post_init__(self) -> None:
        self.key = (self.name, self.start_ms)

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
    emissions: tuple[Emission, ...] = ()


# The outcomes that carry no emissions, made once: most readings end in one of them.
_MERGED: Final = Added()
_DUPLICATE: Final = Added(duplicate=True)
_REFUSED: Final = Added(late=True, refused=True)


class ShardWindows:
    def __init__(
        self,
        shard_id: str,
        window_ms: int,
        lateness_ms: int,
        horizon_ms: int,
        budget: ByteBudget | None = None,
    ) -> None:
        self.shard_id = shard_id
        self._budget = budget
        self.held = 0
        """Bytes its unput windows hold in the budget."""
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
        # Once per reading: locals instead of repeated attribute look-ups, and the common
        # outcome (merged, nothing due) allocates nothing but the offset it stores.
        name, time_ms, length = reading.name, reading.time_ms, self._window_ms
        start = time_ms - time_ms % length
        unicorn = self.unicorns.get(name)
        if unicorn is None:
            unicorn = self.unicorns[name] = Unicorn(time_ms)
            self._dirty_unicorns.add(name)
        window = unicorn.windows.get(start)
        offset = time_ms - start
        if window is not None and offset in window.seen:
            return _DUPLICATE
        latest = unicorn.latest_ms
        before = latest - self._lateness_ms
        if time_ms < before - self._horizon_ms:
            return _REFUSED
        if time_ms > latest:
            unicorn.latest_ms = latest = time_ms
            self._dirty_unicorns.add(name)
        if window is None:
            window = unicorn.windows[start] = Window(name, start, Aggregate.of(reading))
        else:
            window.values.add(reading)
        window.seen.append(offset)
        if window.put_version >= window.version:
            window.arrival = arrival  # the oldest reading not in a put yet
            self._hold(window, window_bytes(name, window.seen))
        else:
            self._hold(window, window.seen.itemsize)
        window.version += 1
        key = window.key
        self._dirty_windows.add(key)
        watermark = latest - self._lateness_ms
        late = start + length <= watermark
        # Window ends sit on multiples of the length: only a crossing can make one due.
        crossed = watermark // length > before // length
        if not late and not crossed:
            self.open[key] = window
            return _MERGED
        emissions: list[Emission] = []
        if late:
            emissions.append(self._emit(window))
        else:
            self.open[key] = window
        if crossed:
            emissions += self._due(unicorn, watermark)
            self._expire(unicorn, watermark)
        return Added(late=late, emissions=tuple(emissions))

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
        if window.queued:
            self._hold(window, RECORD_BYTES)
        window.queued = True
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
        if not window.unput:
            self._release(window)

    # --- the byte budget ----------------------------------------------------------------

    def _hold(self, window: Window, size: int) -> None:
        if self._budget is not None:
            window.held += size
            self.held += size
            self._budget.take(size)

    def _release(self, window: Window) -> None:
        budget = self._budget
        if budget is not None and window.held:
            self.held -= window.held
            budget.give_back(window.held)
            window.held = 0
        window.queued = False

    def release_all(self) -> None:
        """The shard is no longer held here: its windows leave the budget (and memory)."""
        for unicorn in self.unicorns.values():
            for window in unicorn.windows.values():
                self._release(window)

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
        for window in self.open.values():
            self._hold(window, window_bytes(window.name, window.seen))
        emissions: list[Emission] = []
        for (name, start), window in list(self.open.items()):
            watermark = self.unicorns[name].latest_ms - self._lateness_ms
            if start + self._window_ms <= watermark:
                emissions.append(self._emit(window))
        return emissions

    def _restore_window(self, name: str, start: int, value: Any) -> None:
        values, seen, emitted, unput = value
        unicorn = self.unicorns.setdefault(name, Unicorn(start))
        window = Window(name, start, Aggregate.decode(values), array("i", seen))
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
