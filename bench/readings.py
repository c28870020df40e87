"""Raw readings for the aggregator's benchmark: a fleet in the workshop producer's format.

Every unicorn sends one reading a second (the fleet model of `produce`), all of them each
second in turn, as `wildrydes-stream produce` puts them: compact JSON and a newline, fields in
the original producer's order, partition key the Name.
"""

from __future__ import annotations

import functools
import random
from datetime import UTC, datetime, timedelta

from wildrydes_stream.produce.model import Unicorn
from wildrydes_stream.produce.producer import fleet_names

READINGS = 200_000
UNICORNS = 400
START = datetime(2017, 6, 5, 9, 17, 0, 189_000, tzinfo=UTC)


@functools.cache
def readings(
    count: int = READINGS, unicorns: int = UNICORNS, seed: int = 5
) -> list[tuple[str, bytes]]:
    """`count` readings in stream order as (partition key, data)."""
    rng = random.Random(seed)
    fleet = [
        Unicorn(name, random.Random(rng.random())) for name in fleet_names("Shadowfax", unicorns)
    ]
    out: list[tuple[str, bytes]] = []
    second = 0
    while len(out) < count:
        at = START + timedelta(seconds=second)
        for unicorn in fleet[: count - len(out)]:
            out.append((unicorn.name, unicorn.reading(at).encode()))
        second += 1
    return out
