"""One unicorn's sensor, second by second, and the per-minute aggregate of its readings.

Follows the workshop producer: each second Distance is a per-run base in [100, 199] plus 0..19
metres (integers, as the workshop's aggregated day shows), and magic and health points start at
150 and move by -1, 0 or +1. The position moves along one great circle from a start near the
workshop's example reading, so coordinates stay valid however long a run lasts.

To exercise low-magic alerts a unicorn now and then has a drain: its magic falls by one a second
(never faster, so the ±1 drift holds) to a floor below 50, then climbs back by one a second to
the normal band. Outside drains both point values are kept in a band around 150, so only a drain
takes magic below 50. Everything is drawn from the `random.Random` given, so a seed replays a run.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

NAMES = (
    "Shadowfax",
    "Rocinante",
    "Bucephalus",
    "Pegasus",
    "Epona",
    "Artax",
    "Brego",
    "Silver",
    "Trigger",
    "Binky",
    "Falada",
    "Sleipnir",
)

START_POINTS = 150
# Outside a drain, points drift freely within this band and are nudged back at its edges.
BAND = (100, 200)
ALERT_BELOW = 50
DRAIN_FLOOR = (25, 45)  # a drain bottoms out somewhere in here, below the alert threshold
DRAIN_CHANCE = 1 / 1800  # per second: about one drain every half hour of simulated time
ORIGIN = (40.749, -73.985)  # the workshop's example reading (Manhattan)
EARTH_RADIUS_M = 6_371_000.0

Mode = Literal["normal", "drain", "recover"]


def status_time(at: datetime) -> str:
    """`YYYY-MM-DD HH:MM:SS.mmm` (UTC, no zone), as the workshop writes StatusTime."""
    return f"{at:%Y-%m-%d %H:%M:%S}.{at.microsecond // 1000:03d}"


@dataclass(frozen=True)
class Reading:
    """One raw sensor record: what the workshop producer put on the `wildrydes` stream."""

    distance: int
    health_points: int
    latitude: float
    longitude: float
    magic_points: int
    name: str
    status_time: datetime

    def as_dict(self) -> dict[str, Any]:
        # The original producer's field order; dicts keep it through json.dumps.
        return {
            "Distance": self.distance,
            "HealthPoints": self.health_points,
            "Latitude": self.latitude,
            "Longitude": self.longitude,
            "MagicPoints": self.magic_points,
            "Name": self.name,
            "StatusTime": status_time(self.status_time),
        }

    def encode(self) -> bytes:
        """Compact JSON followed by a newline, as the original put it."""
        return json.dumps(self.as_dict(), separators=(",", ":")).encode() + b"\n"


@dataclass
class Unicorn:
    name: str
    rng: random.Random
    base: int = 0
    magic: int = START_POINTS
    health: int = START_POINTS
    drain_chance: float = DRAIN_CHANCE
    mode: Mode = "normal"
    floor: int = 0
    """Where the current drain turns into recovery."""
    origin: tuple[float, float] = ORIGIN
    bearing: float = 0.0
    """Initial bearing from `origin`, degrees clockwise from north."""
    travelled: float = 0.0
    """Metres from `origin` along the bearing's great circle."""
    drains: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.base = self.rng.randint(100, 199)
        lat, lon = self.origin
        self.origin = (lat + self.rng.uniform(-0.02, 0.02), lon + self.rng.uniform(-0.02, 0.02))
        self.bearing = self.rng.uniform(0.0, 360.0)

    def reading(self, at: datetime) -> Reading:
        """The reading for the second ending at `at`: the unicorn moves one second on."""
        distance = self.base + self.rng.randint(0, 19)
        self.travelled += distance
        self.magic = self._next_magic()
        self.health = _drift(self.health, self.rng)
        lat, lon = self.position()
        return Reading(distance, self.health, lat, lon, self.magic, self.name, at)

    def minute(self, start: datetime) -> dict[str, Any]:
        """One minute of once-a-second readings, aggregated as the workshop's module 3 did."""
        readings = [self.reading(start + timedelta(seconds=s)) for s in range(60)]
        magic = [r.magic_points for r in readings]
        health = [r.health_points for r in readings]
        return {
            "Name": self.name,
            "StatusTime": status_time(start.replace(microsecond=0)),
            "Distance": sum(r.distance for r in readings),
            "MinMagicPoints": min(magic),
            "MaxMagicPoints": max(magic),
            "MinHealthPoints": min(health),
            "MaxHealthPoints": max(health),
        }

    def position(self) -> tuple[float, float]:
        """Latitude and longitude `travelled` metres from `origin` on the bearing's great
        circle (the destination-point formula), rounded to about 10 cm."""
        lat1, lon1 = (math.radians(v) for v in self.origin)
        theta = math.radians(self.bearing)
        delta = self.travelled / EARTH_RADIUS_M
        lat2 = math.asin(
            math.sin(lat1) * math.cos(delta) + math.cos(lat1) * math.sin(delta) * math.cos(theta)
        )
        lon2 = lon1 + math.atan2(
            math.sin(theta) * math.sin(delta) * math.cos(lat1),
            math.cos(delta) - math.sin(lat1) * math.sin(lat2),
        )
        lon = (math.degrees(lon2) + 540.0) % 360.0 - 180.0
        return round(math.degrees(lat2), 6), round(lon, 6)

    def _next_magic(self) -> int:
        if self.mode == "normal" and self.rng.random() < self.drain_chance:
            self.mode = "drain"
            self.floor = self.rng.randint(*DRAIN_FLOOR)
            self.drains += 1
        if self.mode == "drain":
            # Mostly down, sometimes a pause: a steady pull, still within ±1 a second.
            self.magic -= self.rng.choice((1, 1, 1, 0))
            if self.magic <= self.floor:
                self.mode = "recover"
            return self.magic
        if self.mode == "recover":
            self.magic += self.rng.choice((1, 1, 1, 0))
            if self.magic >= BAND[0] + 20:
                self.mode = "normal"
            return self.magic
        return _drift(self.magic, self.rng)


def _drift(value: int, rng: random.Random) -> int:
    """-1, 0 or +1; at the band's edges only back inwards or staying, so a day-long random
    walk does not wander off (a walk's spread grows with the square root of time)."""
    if value <= BAND[0]:
        return value + rng.choice((0, 1))
    if value >= BAND[1]:
        return value + rng.choice((-1, 0))
    return value + rng.choice((-1, 0, 1))
