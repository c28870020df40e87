"""Realistic records: per-minute aggregates shaped like the Shadowfax day, many unicorns."""

from __future__ import annotations

import json
import random
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

UNICORNS = 100
START = datetime(2016, 2, 12, tzinfo=UTC)
START_EPOCH = START.timestamp()
SHARDS = 4
# A real-looking 56-digit sequence number; each shard counts up from its own base.
SEQUENCE_BASE = 49590338271490256608559692538361571095921575989136588898


def aggregates(count: int, unicorns: int = UNICORNS, seed: int = 7) -> list[dict[str, Any]]:
    """`count` aggregates in stream order: minute by minute, every unicorn each minute."""
    rng = random.Random(seed)
    state = [[rng.randint(100, 199), 150, 150] for _ in range(unicorns)]
    records: list[dict[str, Any]] = []
    minute = 0
    while len(records) < count:
        stamp = (START + timedelta(minutes=minute)).strftime("%Y-%m-%d %H:%M:%S.000")
        for u in range(unicorns):
            if len(records) == count:
                break
            base, magic, health = state[u]
            magics, healths, distance = [], [], 0
            for _ in range(60):
                distance += base + rng.randint(0, 19)
                magic = max(0, min(200, magic + rng.randint(-1, 1)))
                health = max(0, min(200, health + rng.randint(-1, 1)))
                magics.append(magic)
                healths.append(health)
            state[u][1:] = [magic, health]
            records.append(
                {
                    "Name": f"Unicorn{u:03d}" if u else "Shadowfax",
                    "StatusTime": stamp,
                    "Distance": distance,
                    "MinMagicPoints": min(magics),
                    "MaxMagicPoints": max(magics),
                    "MinHealthPoints": min(healths),
                    "MaxHealthPoints": max(healths),
                }
            )
        minute += 1
    return records


def encode(record: dict[str, Any]) -> bytes:
    """Compact JSON, as the aggregation stage writes it."""
    return json.dumps(record, separators=(",", ":")).encode()


def shard_of(record: dict[str, Any], shards: int = SHARDS) -> int:
    """Records of one unicorn always land on one shard, as with Name as partition key."""
    name: str = record["Name"]
    return zlib.crc32(name.encode()) % shards


def arrival(record: dict[str, Any]) -> float:
    """Epoch seconds the record reached the stream: a second after its minute ended."""
    stamp = datetime.strptime(record["StatusTime"], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
    return round(stamp.timestamp() + 61.234, 3)
