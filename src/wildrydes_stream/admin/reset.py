"""`wildrydes-stream reset`: move shards' checkpoints, safely.

A lease held by a live worker is refused (that worker would overwrite the new position with
its next checkpoint) unless `--force`, which first takes the lease (a conditional write that
makes the running owner drop the shard at its next renewal), then moves the checkpoint and
releases the lease, so the next worker to take it starts exactly there. Every write is
conditional on the counter read, so a lease that moves meanwhile is reported, not clobbered.
The application state stored with the old checkpoint (open windows, alert states) is removed:
it belongs to that position. A position a chosen shard cannot be read from (target.py) is
refused before anything moves.
"""

from __future__ import annotations

import socket
from typing import Any

from botocore.exceptions import ClientError

from wildrydes_stream.admin.liveness import scan_twice
from wildrydes_stream.admin.target import AT_TIMESTAMP, Target, check
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.lease import SHARD_END, Lease
from wildrydes_stream.consumer.leases import LeaseTable
from wildrydes_stream.errors import WildrydesError

__all__ = ["Target", "reset"]


async def reset(
    kinesis: Any,
    dynamodb: Any,
    settings: Settings,
    shards: list[str] | None,
    target: Target,
    *,
    force: bool,
) -> list[str]:
    """Move the checkpoints of `shards` (None: every unfinished shard); one line per change.
    A target some chosen shard cannot be read from is refused (ConfigError) before any moves."""
    table = LeaseTable(dynamodb, settings.lease_table_name, f"reset-{socket.gethostname()}")
    leases, alive = await scan_twice(table, settings.lease_duration_seconds)
    chosen = _choose(leases, shards)
    for lease in chosen:
        await check(kinesis, settings.stream_name, lease.shard_id, target)
    live = [lease for lease in chosen if lease.owner and lease.owner in alive]
    if live and not force:
        held = ", ".join(f"{lease.shard_id} ({lease.owner})" for lease in live)
        raise WildrydesError(
            f"live workers hold {held}: stop them first, or pass --force to take the leases "
            "(their owners drop the shards at their next renewal)"
        )
    return [await _move_retrying(dynamodb, table, lease, target, force) for lease in chosen]


async def _move_retrying(
    dynamodb: Any, table: LeaseTable, lease: Lease, target: Target, force: bool
) -> str:
    """Under --force a live owner keeps renewing: read the lease again and retry."""
    for _ in range(5 if force else 1):
        try:
            return await _move(dynamodb, table, lease, target)
        except _Moved:
            fresh = await table.get(lease.shard_id)
            if fresh is None:
                break
            lease = fresh
    raise WildrydesError(f"the lease of {lease.shard_id} changed while resetting it: run again")


class _Moved(Exception):
    """The lease's counter moved between the read and the write."""


def _choose(leases: dict[str, Lease], shards: list[str] | None) -> list[Lease]:
    if shards is None:
        return [lease for _, lease in sorted(leases.items()) if lease.checkpoint != SHARD_END]
    missing = [shard for shard in shards if shard not in leases]
    if missing:
        raise WildrydesError(
            f"no lease for {', '.join(missing)} in the lease table: "
            "`wildrydes-stream status` lists the shards"
        )
    return [leases[shard] for shard in shards]


async def _move(dynamodb: Any, table: LeaseTable, lease: Lease, target: Target) -> str:
    since = lease.starting_ms if lease.checkpoint == AT_TIMESTAMP else None
    before = str(Target(lease.checkpoint, since))
    values: dict[str, Any] = {
        ":cp": {"S": target.checkpoint},
        ":zero": {"N": "0"},
        ":next": {"N": str(lease.counter + 1)},
        ":seen": {"N": str(lease.counter)},
    }
    expression = (
        "SET #cp = :cp, checkpointSubSequenceNumber = :zero, ownerSwitchesSinceCheckpoint = "
        ":zero, leaseCounter = :next"
    )
    if target.moment_ms is not None:
        expression += ", startingTimestamp = :start"
        values[":start"] = {"N": str(target.moment_ms)}
    removed = [
        "leaseOwner",
        "pendingCheckpoint",
        "pendingCheckpointSubSequenceNumber",
        "pendingCheckpointState",
        "wildrydesState",
        "wildrydesStateRef",
        "checkpointOwner",
    ]
    if target.moment_ms is None:
        removed.append("startingTimestamp")
    try:
        # Taking and releasing in one conditional write: the counter moves and the owner goes,
        # so a running owner's next write fails and it lets the shard go.
        await dynamodb.update_item(
            TableName=table.table_name,
            Key={"leaseKey": {"S": lease.shard_id}},
            UpdateExpression=expression + " REMOVE " + ", ".join(removed),
            ConditionExpression="leaseCounter = :seen",
            ExpressionAttributeNames={"#cp": "checkpoint"},
            ExpressionAttributeValues=values,
        )
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
            raise _Moved from None
        raise
    owner = f" (taken from {lease.owner})" if lease.owner else ""
    return f"{lease.shard_id}: {before} -> {target}{owner}"
