"""The whole pipeline at a fleet's size, every stage a real process on the emulators.

A thousand unicorns a reading a second on one shard, then a split and a merge of it while the
readings flow, late readings on both sides of each, producers' duplicates, readings past the
horizon, a unicorn two hours ahead, names nobody expected, and some unicorns whose magic dips
below the threshold and recovers. Two `aggregate` replicas read the raw stream; one is killed
with SIGKILL while reading the parent, one stopped with SIGTERM while the children are read,
one killed again while the merged shard is read, each started again. `run` copies the
aggregates into the table and posts its low-magic alerts to a webhook here.

Every row of the table must equal what its unicorn's readings give (tests/aggregate/
pipeline_support.py computes that from the rules of docs/how-it-works.md), each dip must give
exactly one `firing` and one `resolved` alert, and exactly the readings past the horizon are
dead-lettered.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.aggregate.pipeline_support import (
    EPOCH,
    HORIZON_MS,
    LATENESS_MS,
    SKEWED,
    THRESHOLD,
    Alert,
    Feed,
    Pipeline,
    expect,
    plan,
    table_rows,
)
from tests.aggregate.test_aggregate import aggregate_settings
from tests.helpers import scan_table, wait_for
from tests.process import service_env
from wildrydes_stream.admin.provision import ensure_stream, ensure_table
from wildrydes_stream.config import Settings
from wildrydes_stream.local.webhook import AlertReceiver


def received(alert: dict[str, Any]) -> Alert:
    minute = datetime.strptime(alert["status_time"], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
    assert alert["threshold"] == THRESHOLD, alert
    minute_ms = (minute - EPOCH) // timedelta(milliseconds=1)
    return Alert(alert["name"], alert["state"], minute_ms, alert["min_magic_points"])


def letters(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
async def test_a_fleet_through_reshards_and_killed_replicas_leaves_every_row_and_alert_right(
    settings: Settings, kinesis: Any, dynamodb: Any, aws_env: dict[str, str], tmp_path: Path
) -> None:
    s = aggregate_settings(
        settings,
        allowed_lateness_seconds=LATENESS_MS / 1000,
        late_horizon_seconds=HORIZON_MS / 1000,
        idle_window_timeout_seconds=6.0,
        lease_duration_seconds=3.0,
        lease_poll_interval_seconds=0.5,
        shard_sync_interval_seconds=0.5,
        idle_poll_interval_seconds=0.2,
        checkpoint_interval_seconds=0.5,
        deadletter_file=str(tmp_path / "aggregate-deadletter.jsonl"),
    )
    await ensure_stream(kinesis, s.raw_stream_name, 1)
    await ensure_stream(kinesis, s.stream_name, 1)
    await ensure_table(dynamodb, s)
    p = plan()
    expected = expect(p)
    assert len(expected.rows) == 4000
    assert {a.name for a in expected.alerts} >= {SKEWED, "a\r\nb"}

    copier_letters = tmp_path / "copier-deadletter.jsonl"
    pipeline = Pipeline(service_env(s, aws_env))
    feed = Feed(kinesis, s.raw_stream_name, p)
    feeding: asyncio.Task[None] | None = None
    async with AlertReceiver(io.StringIO()) as receiver:
        try:
            await pipeline.start_copier(
                WILDRYDES_ALERT_WEBHOOK_URL=receiver.url,
                WILDRYDES_DEADLETTER_FILE=str(copier_letters),
            )
            await asyncio.gather(pipeline.start_aggregator("a"), pipeline.start_aggregator("b"))
            [parent] = [x["ShardId"] for x in await feed.open_shards()]

            async def reader(shard: str, read_at_least: int) -> str:
                try:
                    return await pipeline.reader(shard, read_at_least, timeout=120)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\n{await _stored(dynamodb, s)}") from None

            feeding = asyncio.create_task(feed.run())

            # The feed stops at each gate until the shard there has a reader well into it (a
            # shard cannot end while the feed waits), then goes on as that reader is stopped.
            # SIGKILL the parent's reader half way through it; a new process takes its place.
            await feed.reached(0, feeding)
            victim = await reader(parent, 20_000)
            feed.go_on(0)
            assert await pipeline.stop(victim, signal.SIGKILL) == -signal.SIGKILL
            await pipeline.start_aggregator(victim)

            # SIGTERM a child's reader while the children are read: it hands its shard over.
            await feed.reached(1, feeding)
            child = feed.open_after["split"][0]
            victim = await reader(child, 5_000)
            feed.go_on(1)
            assert await pipeline.stop(victim, signal.SIGTERM) == 0
            await pipeline.start_aggregator(victim)

            # SIGKILL the merged shard's reader while it reads.
            await feed.reached(2, feeding)
            [merged] = feed.open_after["merge"]
            victim = await reader(merged, 5_000)
            feed.go_on(2)
            assert await pipeline.stop(victim, signal.SIGKILL) == -signal.SIGKILL
            await pipeline.start_aggregator(victim)
            await feeding
            _scenario_as_planned(p, feed, parent, merged)

            seen: dict[Any, dict[str, Any]] = {}

            async def table_complete() -> bool:
                nonlocal seen
                seen = table_rows(await scan_table(dynamodb, s.table_name))
                return seen == expected.rows

            try:
                await wait_for(table_complete, timeout=180, interval=2.0)
            except TimeoutError:
                wrong = {k: (seen.get(k), v) for k, v in expected.rows.items() if seen.get(k) != v}
                raise AssertionError(
                    f"{len(wrong)} rows differ, e.g. {list(wrong.items())[:5]}; "
                    f"unexpected: {list(set(seen) - set(expected.rows))[:5]}\n"
                    f"{pipeline.describe()}"
                ) from None

            async def alerted() -> bool:
                return len(receiver.received) >= len(expected.alerts)

            await wait_for(alerted, timeout=60, interval=0.2)
            for replica in list(pipeline.aggregators):
                assert await pipeline.stop(replica, signal.SIGTERM) == 0
            assert pipeline.copier is not None
            pipeline.copier.send(signal.SIGTERM)
            assert await pipeline.copier.wait(60) == 0
        finally:
            if feeding is not None and not feeding.done():
                feeding.cancel()
            await pipeline.close()

    # Each dip: one firing at its minute, one resolved at the next; nothing else, no repeat.
    assert Counter(map(received, receiver.received)) == Counter(expected.alerts)
    assert len({a["id"] for a in receiver.received}) == len(receiver.received)
    # Exactly the readings past the horizon are refused (each once or, read again after a
    # SIGKILL, more often: the same sequence number).
    dead = letters(Path(s.deadletter_file))
    assert {e["kind"] for e in dead} <= {"late"}
    assert {e["sequence_number"] for e in dead} == {
        feed.results[i]["SequenceNumber"] for i in expected.refused
    }
    assert letters(copier_letters) == []


def _scenario_as_planned(p: Any, feed: Feed, parent: str, merged: str) -> None:
    """Late readings and duplicates landed on both sides of each reshard, the readings past
    the horizon on the merged shard (so this test covers what it says)."""
    children = set(feed.open_after["split"])
    assert len(children) == 2
    assert not {parent, merged} & children

    def shards(indices: set[int]) -> set[str]:
        return {feed.results[i]["ShardId"] for i in indices}

    assert shards(p.late) == children | {merged}
    assert shards(p.duplicates) == {parent, merged} | children
    assert shards(p.past_horizon) == {merged}


async def _stored(dynamodb: Any, s: Settings) -> str:
    """The aggregator's leases (checkpoint, owner, state reference) and the state table's
    items, for a failure message."""
    leases = await scan_table(dynamodb, s.aggregate_lease_table_name)
    state_table = s.replace(lease_table_name=s.aggregate_lease_table_name).state_table_name
    parts = await dynamodb.scan(
        TableName=state_table,
        ProjectionExpression="shardId, #p",
        ExpressionAttributeNames={"#p": "part"},
    )
    lines = [
        f"lease {item['leaseKey']['S']}: {item.get('checkpoint', {}).get('S')} "
        f"owner {item.get('leaseOwner', {}).get('S')} "
        f"state {item.get('wildrydesStateRef', {}).get('S')}"
        for item in leases
    ]
    lines += sorted(f"state item {i['shardId']['S']} {i['part']['S']}" for i in parts["Items"])
    return "\n".join(lines)
