"""What an aggregator checkpoint writes to the state table, per shard, at a fleet's size.

One shard's windows (aggregate/windows.py) fed one simulated hour of readings: N unicorns, one
reading every `period` seconds each, the default one-hour late horizon, a checkpoint every 5 s
(the default interval). Each checkpoint's segment is encoded as the state store encodes it
(consumer/statestore.py: compressed JSON items of at most ~350 KB) and weighed: bytes, items,
and write units (1 per KB of each item, rounded up, as DynamoDB bills a write). A full copy
(written when the segments since the last one outweigh it) is weighed at the hour's end.

    python -m bench.statecost [--unicorns 100,1000,5000]

Prints one table row per fleet size and a JSON line. No AWS, no emulator: the figures are the
encoded sizes, exactly what the store would send.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from decimal import Decimal

from wildrydes_stream.aggregate.readings import Reading
from wildrydes_stream.aggregate.windows import ShardWindows
from wildrydes_stream.consumer.statestore import _chunks

HOUR_MS = 3_600_000
T0_MS = 1_496_654_220_000


def weigh(changes: dict[tuple[str, str], object]) -> tuple[int, int, int]:
    """(bytes, items, write units) of one segment."""
    items = list(_chunks(changes))
    size = sum(len(item) + 40 for item in items)
    units = sum(-(-(len(item) + 40) // 1024) for item in items)
    return size, len(items), units


def run(unicorns: int, period: int, minutes: int, interval_s: int = 5) -> dict[str, float]:
    rng = random.Random(unicorns)
    windows = ShardWindows("shardId-000000000000", 60_000, 60_000, HOUR_MS)
    names = [f"unicorn-{i:05d}" for i in range(unicorns)]
    offsets = [rng.randint(0, period * 1000 - 1) for _ in names]
    checkpoints: list[tuple[int, int, int]] = []
    started = time.process_time()
    for second in range(0, minutes * 60, interval_s):
        for tick in range(second, second + interval_s):
            for name, offset in zip(names, offsets, strict=True):
                if (tick - offset // 1000) % period:
                    continue
                at = T0_MS + tick * 1000 + offset % 1000
                windows.add(
                    Reading(name, at, Decimal(rng.randint(0, 40)), Decimal(150), Decimal(150)),
                    0.0,
                )
        checkpoints.append(weigh(windows.changes()))
    cpu = time.process_time() - started
    # The last 10 minutes: steady state (a full hour of windows is held by then).
    steady = checkpoints[-(600 // interval_s) :]
    full = weigh(windows.entries())
    n = len(steady)
    return {
        "unicorns": unicorns,
        "reading_period_s": period,
        "windows_held": sum(len(u.windows) for u in windows.unicorns.values()),
        "checkpoint_kb": round(sum(c[0] for c in steady) / n / 1024, 1),
        "checkpoint_items": round(sum(c[1] for c in steady) / n, 1),
        "checkpoint_write_units": round(sum(c[2] for c in steady) / n, 1),
        "write_units_per_s": round(sum(c[2] for c in steady) / n / interval_s, 1),
        "full_copy_kb": round(full[0] / 1024, 1),
        "full_copy_items": full[1],
        "full_copy_write_units": full[2],
        "cpu_s": round(cpu, 1),
    }


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unicorns", default="100,1000,5000")
    parser.add_argument("--minutes", type=int, default=70, help="simulated minutes")
    args = parser.parse_args(argv)
    rows = []
    print(
        f"{'unicorns':>8} {'period':>6} {'windows':>8} {'ckpt KB':>8} {'items':>5} "
        f"{'WCU':>6} {'WCU/s':>6} {'full KB':>8} {'full WCU':>8}"
    )
    for count in (int(n) for n in args.unicorns.split(",")):
        # A shard takes 1,000 records a second: more unicorns than that report less often.
        period = max(1, -(-count // 1000))
        row = run(count, period, args.minutes)
        rows.append(row)
        print(
            f"{row['unicorns']:>8} {row['reading_period_s']:>5}s {row['windows_held']:>8} "
            f"{row['checkpoint_kb']:>8} {row['checkpoint_items']:>5} "
            f"{row['checkpoint_write_units']:>6} {row['write_units_per_s']:>6} "
            f"{row['full_copy_kb']:>8} {row['full_copy_write_units']:>8}"
        )
    print(json.dumps({"state_checkpoint_cost": rows}))
    return rows


if __name__ == "__main__":
    main()
