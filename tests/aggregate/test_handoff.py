"""An aggregator's shards move between replicas without a stall and without a window put
twice: balancing hands a shard over with its open windows in the checkpointed state, and a
replica stopping (SIGTERM) releases its shards, read on by the other within a lease poll.
"""

from __future__ import annotations

import collections
import time
from datetime import timedelta
from typing import Any

from tests.aggregate.test_aggregate import (
    T0,
    aggregating,
    dead_letters,
    decoded,
    read_stream,
    reference,
    wait_output,
)
from tests.aggregate.test_fleet import minute_of
from tests.helpers import holds, put_records, wait_for
from wildrydes_stream.config import Settings
from wildrydes_stream.produce.model import status_time

HERD = [f"unicorn-{i:03d}" for i in range(120)]


async def test_shards_move_between_aggregators_without_a_stall_or_a_window_put_twice(
    streams: Settings, kinesis: Any
) -> None:
    # Open windows stay open across each move (no idle put): they travel in the state.
    s = streams.replace(idle_window_timeout_seconds=60.0, lease_duration_seconds=3.0)
    raw = s.raw_stream_name
    put = minute_of(HERD, 0, range(0, 60, 10), 1) + minute_of(HERD, 1, range(0, 30, 10), 2)
    await put_records(kinesis, raw, put)
    async with aggregating(s.replace(worker_id="first")) as first:
        assert first.supervisor is not None
        await wait_for(holds(lambda: _holds(first, 2)))
        async with aggregating(s.replace(worker_id="second")) as second:
            assert second.supervisor is not None
            # Balancing: the second asks for one shard, the first hands it over.
            await wait_for(holds(lambda: _holds(first, 1) and _holds(second, 1)), timeout=20)
            more = minute_of(HERD, 1, range(30, 60, 10), 3) + minute_of(HERD, 2, (0, 10, 20), 4)
            put += more
            await put_records(kinesis, raw, more)
            stopped = time.monotonic()
            await first.stop()  # what SIGTERM does
            await wait_for(holds(lambda: _holds(second, 2)), timeout=10)
            pickup = time.monotonic() - stopped
            assert pickup <= 2.0, pickup
            last = minute_of(HERD, 3, (0, 10, 20), 5)
            put += last
            await put_records(kinesis, raw, last)
            # Minutes 0 to 2 are due (minute 3 stays open): each put once, with all its readings.
            open_minute = status_time(T0 + timedelta(minutes=3))
            expected = {
                key: value for key, value in reference(put).items() if key[1] != open_minute
            }
            await wait_output(kinesis, s.stream_name, expected)
    puts = collections.Counter(
        (record["Name"], record["StatusTime"])
        for record in map(decoded, await read_stream(kinesis, s.stream_name))
    )
    assert [key for key, count in puts.items() if count > 1] == []
    assert not dead_letters(s)


def _holds(aggregator: Any, count: int) -> bool:
    supervisor = aggregator.supervisor
    return supervisor is not None and len(supervisor.owned) == count
