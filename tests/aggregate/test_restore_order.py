"""Restored windows come out in event-time order per unicorn, whatever order the stored
entries are in (a checkpoint's segment lists the windows changed in no particular order).

`run`'s alerts follow event time: a window older than the newest one evaluated changes
nothing. So if a restore put a unicorn's next minute before its low minute (both held unput,
a PutRecords outage for instance, then a restart), the dip would raise no alert at all.
"""

from __future__ import annotations

import json
from typing import Any

from wildrydes_stream.aggregate.readings import decode_reading
from wildrydes_stream.aggregate.windows import ShardWindows
from wildrydes_stream.alerts.state import UnicornStates
from wildrydes_stream.consumer.state import Entries

MINUTE = 60_000


def _reading(name: str, second: int, magic: int) -> Any:
    minute, second = divmod(second, 60)
    raw = {
        "Distance": 1,
        "HealthPoints": 100,
        "MagicPoints": magic,
        "Name": name,
        "StatusTime": f"2017-06-05 09:{17 + minute:02d}:{second:02d}.000",
    }
    return decode_reading(json.dumps(raw).encode())[1]


def _held_unput(names: list[str]) -> Entries:
    """The state of a shard whose puts all failed: five minutes of readings a unicorn, low in
    minute 1, stored with the windows in reverse order."""
    windows = ShardWindows("shardId-0", MINUTE, 10_000, 3_600_000)
    for second in range(0, 290, 5):
        for name in names:
            windows.add(_reading(name, second, 40 if 60 <= second < 120 else 100), 0.0)
    entries = windows.entries()
    return dict(reversed(list(entries.items())))


def test_a_restore_puts_each_unicorns_due_windows_in_event_time_order() -> None:
    names = [f"unicorn-{i}" for i in range(50)]
    restored = ShardWindows("shardId-0", MINUTE, 10_000, 3_600_000)
    emissions = restored.restore([_held_unput(names)])
    for name in names:
        starts = [e.start_ms for e in emissions if e.name == name]
        assert len(starts) == 4, name  # minutes 0..3 are due, minute 4 is open
        assert starts == sorted(starts), name
        # The open minute goes on the idle timeout, after them.
        assert [e.start_ms for e in restored.idle(name)] == [max(starts) + MINUTE]


def test_a_dip_held_unput_through_a_restart_still_raises_its_alerts() -> None:
    restored = ShardWindows("shardId-0", MINUTE, 10_000, 3_600_000)
    alerts = UnicornStates(threshold=50)
    raised = [
        alerts.evaluate("shardId-0", n, e.name, e.values.min_magic, e.start_ms)
        for n, e in enumerate(restored.restore([_held_unput(["Shadowfax"])]))
    ]
    assert [a for a in raised if a] == ["firing", "resolved"]
