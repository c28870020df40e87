"""`wildrydes-stream status`: every shard and worker as the lease table and Kinesis see them.

Reads only: ListShards, a scan of the lease table twice (to tell live owners from gone ones)
and, for each shard with unread records, one GetRecords after its checkpoint (how far behind
it is: Kinesis's MillisBehindLatest, and how old the oldest unread record is). Also the
application's enhanced fan-out consumer (DescribeStreamConsumer): its state in `fanout` mode,
and in `polling` mode whether one of that name is still registered (and charged for) unused.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from botocore.exceptions import ClientError

from wildrydes_stream.admin.liveness import scan_twice
from wildrydes_stream.aws.retry import describe_error, error_code
from wildrydes_stream.config import Settings, stream_setting
from wildrydes_stream.consumer.lease import SHARD_END, Lease
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.errors import MissingResourceError
from wildrydes_stream.source.shards import Shard, list_shards


@dataclass
class ShardStatus:
    shard: str
    state: str  # open, closed (not read to its end yet), done (SHARD_END checkpointed)
    owner: str | None
    owner_alive: bool | None
    checkpoint: str | None
    behind_ms: int | None
    oldest_unread_age_s: float | None
    parents: list[str]
    problem: str | None = None
    """Why the shard cannot be read from its checkpoint (Kinesis refuses it), if so."""


@dataclass
class ConsumerStatus:
    """The application's enhanced fan-out stream consumer."""

    name: str
    state: str
    """ACTIVE, CREATING, DELETING, `not registered`, or why it could not be described."""
    arn: str | None
    created: str | None
    in_use: bool
    """read_mode is `fanout`: the service reads through it."""


class DescribesConsumers(Protocol):
    async def describe_stream_consumer(self, stream_arn: str, name: str) -> dict[str, Any]: ...


@dataclass
class Status:
    application: str
    """`run` or `aggregate`: whose consumer this is."""
    stream: str
    lease_table: str
    shards: list[ShardStatus]
    workers: dict[str, list[str]]
    """Owner -> shards it holds."""
    alive: list[str]
    fanout_consumer: ConsumerStatus | None = None
    """In `fanout` mode always; in `polling` mode only when one is registered unused."""


async def status(
    kinesis: Any,
    dynamodb: Any,
    settings: Settings,
    application: str,
    consumers: DescribesConsumers | None = None,
) -> Status:
    """`settings` as the application's consumer reads: for `aggregate`, the raw stream and
    its own lease table (aggregate/app.py consumer_settings). `consumers` describes stream
    consumers (the fan-out client when `fanout_endpoint_url` is set); else `kinesis` does."""
    try:
        shards = await list_shards(kinesis, settings.stream_name)
    except MissingResourceError:
        raise MissingResourceError(
            f"Kinesis stream {settings.stream_name!r} does not exist: create it or set "
            f"{stream_setting(settings)}"
        ) from None
    table = LeaseTable(dynamodb, settings.lease_table_name, "status")
    leases, alive = await scan_twice(table, settings.lease_duration_seconds)
    rows = [
        await _shard_status(kinesis, settings, s, leases.get(s.shard_id), alive) for s in shards
    ]
    workers: dict[str, list[str]] = {}
    for lease in leases.values():
        if lease.owner:
            workers.setdefault(lease.owner, []).append(lease.shard_id)
    return Status(
        application,
        settings.stream_name,
        settings.lease_table_name,
        rows,
        {owner: sorted(held) for owner, held in sorted(workers.items())},
        sorted(alive),
        await _fanout_consumer(consumers or _BotocoreConsumers(kinesis), kinesis, settings),
    )


async def _fanout_consumer(
    consumers: DescribesConsumers, kinesis: Any, settings: Settings
) -> ConsumerStatus | None:
    in_use = settings.read_mode == "fanout"
    name = settings.fanout_consumer_name
    try:
        summary = await kinesis.describe_stream_summary(StreamName=settings.stream_name)
        arn = str(summary["StreamDescriptionSummary"]["StreamARN"])
        description = await consumers.describe_stream_consumer(arn, name)
    except ClientError as exc:
        if error_code(exc) == "ResourceNotFoundException":
            return ConsumerStatus(name, "not registered", None, None, in_use) if in_use else None
        if not in_use:  # a Kinesis without enhanced fan-out (an emulator): nothing to show
            return None
        return ConsumerStatus(name, f"cannot be described: {describe_error(exc)}", None, None, True)
    created = description.get("ConsumerCreationTimestamp")
    return ConsumerStatus(
        name,
        str(description.get("ConsumerStatus", "?")),
        str(description.get("ConsumerARN")),
        _timestamp(created),
        in_use,
    )


def _timestamp(value: Any) -> str | None:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")
    return None


class _BotocoreConsumers:
    def __init__(self, kinesis: Any) -> None:
        self._kinesis = kinesis

    async def describe_stream_consumer(self, stream_arn: str, name: str) -> dict[str, Any]:
        answer = await self._kinesis.describe_stream_consumer(
            StreamARN=stream_arn, ConsumerName=name
        )
        description: dict[str, Any] = answer["ConsumerDescription"]
        return description


async def _shard_status(
    kinesis: Any, settings: Settings, shard: Shard, lease: Lease | None, alive: set[str]
) -> ShardStatus:
    done = lease is not None and lease.checkpoint == SHARD_END
    state = "done" if done else "closed" if shard.closed else "open"
    owner = lease.owner if lease else None
    behind, oldest, problem = (None, None, None)
    if not done:
        try:
            behind, oldest = await _lag(kinesis, settings, shard, lease)
        except ClientError as exc:
            if error_code(exc) != "InvalidArgumentException":
                raise
            # A checkpoint the worker cannot start at either (it retries it for ever).
            problem = (
                f"Kinesis refuses the checkpoint ({exc.response['Error'].get('Message', '')}): "
                "move it with `reset`"
            )
    return ShardStatus(
        shard.shard_id,
        state,
        owner,
        (owner in alive) if owner else None,
        lease.checkpoint if lease else None,
        behind,
        oldest,
        list(shard.parents),
        problem,
    )


async def _lag(
    kinesis: Any, settings: Settings, shard: Shard, lease: Lease | None
) -> tuple[int | None, float | None]:
    """MillisBehindLatest and the age of the first unread record, read after the checkpoint."""
    kwargs: dict[str, Any] = {"StreamName": settings.stream_name, "ShardId": shard.shard_id}
    checkpoint = lease.checkpoint if lease else settings.starting_position
    if checkpoint.isdigit():
        kwargs |= {
            "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
            "StartingSequenceNumber": checkpoint,
        }
    elif checkpoint in ("TRIM_HORIZON", "LATEST"):
        kwargs["ShardIteratorType"] = checkpoint
    else:
        return None, None
    iterator = (await kinesis.get_shard_iterator(**kwargs)).get("ShardIterator")
    if iterator is None:
        return None, None
    response = await kinesis.get_records(ShardIterator=iterator, Limit=1)
    records = response.get("Records", [])
    oldest = None
    if records:
        arrived = records[0].get("ApproximateArrivalTimestamp")
        if isinstance(arrived, datetime):
            oldest = round(time.time() - arrived.timestamp(), 1)
    return int(response.get("MillisBehindLatest", 0)), oldest


def render(report: Status, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(report), indent=2)
    lines = [
        f"{report.application}: stream {report.stream}, lease table {report.lease_table}",
        "",
        f"{'SHARD':24} {'STATE':7} {'OWNER':28} {'ALIVE':6} {'BEHIND':>9} {'UNREAD AGE':>11} "
        "PARENTS  CHECKPOINT",
    ]
    for row in report.shards:
        alive = "-" if row.owner_alive is None else ("yes" if row.owner_alive else "NO")
        behind = "-" if row.behind_ms is None else f"{row.behind_ms / 1000:.1f}s"
        age = "-" if row.oldest_unread_age_s is None else f"{row.oldest_unread_age_s:.0f}s"
        lines.append(
            f"{row.shard:24} {row.state:7} {row.owner or '-':28} {alive:6} {behind:>9} "
            f"{age:>11} {','.join(row.parents) or '-':8} {row.checkpoint or '-'}"
        )
        if row.problem:
            lines.append(f"  {row.shard}: {row.problem}")
    lines += ["", f"{'WORKER':28} {'ALIVE':6} SHARDS"]
    for owner, held in report.workers.items():
        alive = "yes" if owner in report.alive else "NO"
        lines.append(f"{owner:28} {alive:6} {len(held)}: {', '.join(held)}")
    if not report.workers:
        lines.append("(no worker holds a lease)")
    consumer = report.fanout_consumer
    if consumer is not None:
        lines += ["", _consumer_line(consumer)]
    return "\n".join(lines)


def _consumer_line(consumer: ConsumerStatus) -> str:
    line = f"fan-out consumer {consumer.name}: {consumer.state}"
    if consumer.created:
        line += f", registered {consumer.created}"
    if consumer.arn:
        line += f" ({consumer.arn})"
    if not consumer.in_use:
        line += (
            "; read_mode is polling, so nothing reads through it, yet it is charged while "
            "registered: deregister it (DeregisterStreamConsumer) if no replica will use it"
        )
    return line
