"""The lease table, in the layout of the Kinesis Client Library's.

One item per shard: `leaseKey` (shard id), `leaseOwner`, `leaseCounter`, `checkpoint` (a
sequence number or a sentinel), `checkpointSubSequenceNumber`, `ownerSwitchesSinceCheckpoint`
and `parentShardId` (string set). Every write after taking a lease is conditional on this worker
still owning it at the counter it last saw, so two replicas can never both advance one shard.

One attribute KCL does not have: `startingTimestamp` (N, epoch ms), the moment a lease whose
`checkpoint` is still `LATEST` or `AT_TIMESTAMP` starts at. The sentinel stays (KCL reads it);
the moment lets the next owner read from where the first one started instead of asking for a
new LATEST, which would skip whatever arrived while the lease moved.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from botocore.exceptions import ClientError

from wildrydes_stream.aws.lean import DynamoDBData
from wildrydes_stream.aws.retry import backoff_delay, fault_of
from wildrydes_stream.aws.tables import ensure_table
from wildrydes_stream.errors import LeaseLostError

log = logging.getLogger(__name__)

SHARD_END: Final = "SHARD_END"
TRIM_HORIZON: Final = "TRIM_HORIZON"
LATEST: Final = "LATEST"
AT_TIMESTAMP: Final = "AT_TIMESTAMP"
MOMENT_SENTINELS: Final = frozenset({LATEST, AT_TIMESTAMP})
"""Checkpoints that name a moment rather than a record: the lease keeps `startingTimestamp`."""


@dataclass(slots=True)
class Lease:
    shard_id: str
    checkpoint: str
    owner: str | None
    counter: int
    parents: tuple[str, ...] = ()
    owner_switches: int = 0
    starting_ms: int | None = None
    """`startingTimestamp`: where a LATEST or AT_TIMESTAMP checkpoint starts (epoch ms)."""
    starting_inherited: bool = False
    """`starting_ms` was recorded by an earlier tenure (not by this take or create)."""
    checkpoint_owner: str | None = None
    """`checkpointOwner` (KCL 3): the previous owner still finishing a hand-off to `owner`;
    nobody else reads the shard until it has checkpointed and cleared it."""
    children: tuple[str, ...] = ()
    """`childShardIds`, once the shard is finished and its children are known."""
    subsequence: int = 0
    """`checkpointSubSequenceNumber`: KCL's position inside a KPL-aggregated record; above 0
    the record at `checkpoint` was only partly processed."""
    state_ref: str | None = None
    """`wildrydesStateRef`: where the application's state of the shard as of `checkpoint`
    is in the state table (consumer/statestore.py), written with it in one conditional
    update."""
    confirmed_at: float = field(default=0.0, compare=False)
    """Monotonic time at which the last write that proved we hold the lease was sent."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, compare=False, repr=False)
    """One write at a time per tenure: checkpoint, renewal and release all move the counter
    they are conditional on, so two in flight would make the second look like a loss."""

    @property
    def at_shard_end(self) -> bool:
        return self.checkpoint == SHARD_END

    @property
    def at_moment(self) -> bool:
        """No record read yet under a LATEST or AT_TIMESTAMP start."""
        return self.checkpoint in MOMENT_SENTINELS


def _is_conditional_failure(exc: ClientError) -> bool:
    return bool(exc.response["Error"]["Code"] == "ConditionalCheckFailedException")


class LeaseTable:
    def __init__(
        self,
        client: Any,
        table_name: str,
        owner: str,
        at_timestamp_ms: int | None = None,
        *,
        fast: DynamoDBData | None = None,
    ) -> None:
        self._client = client
        self.table_name = table_name
        self.owner = owner
        self._at_timestamp_ms = at_timestamp_ms
        """The configured AT_TIMESTAMP start, recorded on leases that start there."""
        self._fast = fast
        """The lean client for the frequent calls (renewals, checkpoints, the scan a second):
        through botocore, each renewal cost about a millisecond of CPU, and a worker with 256
        shards renews 77 leases a second. Retried here as botocore's standard mode would."""

    async def ensure_table(self) -> None:
        """Create the table (on-demand capacity) when missing and wait until it is active."""
        await ensure_table(self._client, self.table_name, [("leaseKey", "HASH")], "lease table")

    async def get(self, shard_id: str) -> Lease | None:
        response = await self._client.get_item(
            TableName=self.table_name,
            Key={"leaseKey": {"S": shard_id}},
            ConsistentRead=True,
            **LEASE_PROJECTION,
        )
        item = response.get("Item")
        return _from_item(item) if item else None

    async def all(self) -> dict[str, Lease]:
        """Every lease of this stream's shards. Other items a KCL application may keep in the
        table (multi-stream leases `account:stream:epoch:shardId`, KCL 3 `entityType` items)
        are skipped: never read as shards, never deleted."""
        leases: dict[str, Lease] = {}
        async for items in self._scan():
            for item in items:
                if not is_shard_lease(item):
                    continue
                lease = _from_item(item)
                leases[lease.shard_id] = lease
        return leases

    async def _scan(self) -> AsyncIterator[list[dict[str, Any]]]:
        params: dict[str, Any] = {
            "TableName": self.table_name,
            "ConsistentRead": True,
            **LEASE_PROJECTION,
        }
        fast = self._fast
        if fast is None:
            paginator = self._client.get_paginator("scan")
            async for page in paginator.paginate(**params):
                yield page.get("Items", [])
            return
        while True:
            page = await _retried(lambda: fast.lease_scan(**params))
            yield page.get("Items", [])
            last = page.get("LastEvaluatedKey")
            if not last:
                return
            params["ExclusiveStartKey"] = last

    async def note_children(self, shard_id: str, children: list[str]) -> None:
        """Write `childShardIds` on a finished shard's lease, as KCL does, so a KCL worker
        taking the table over need not look them up."""
        try:
            await self._client.update_item(
                TableName=self.table_name,
                Key={"leaseKey": {"S": shard_id}},
                UpdateExpression="SET childShardIds = :children",
                ConditionExpression="attribute_exists(leaseKey)",
                ExpressionAttributeValues={":children": {"SS": sorted(children)}},
            )
        except ClientError as exc:
            if not _is_conditional_failure(exc):
                raise

    async def acquire(
        self,
        shard_id: str,
        parents: tuple[str, ...],
        initial: str,
        takeable: Callable[[Lease], bool],
        hash_range: tuple[str, str] = ("", ""),
    ) -> Lease | None:
        """Create the shard's lease owned by us, or take the existing one over if `takeable`.

        None when another worker holds it and `takeable` says it may not be taken.
        """
        for _ in range(10):
            existing = await self.get(shard_id)
            try:
                if existing is None:
                    return await self._create(shard_id, parents, initial, hash_range)
                if not takeable(existing):
                    return None
                return await self._take(existing)
            except ClientError as exc:
                if not _is_conditional_failure(exc):
                    raise
                # Someone changed it between our read and write: read again.
        raise LeaseLostError(shard_id)

    def _moment_ms(self, sentinel: str) -> int:
        """The moment a lease at `sentinel` starts at: now for LATEST, else the setting."""
        if sentinel == AT_TIMESTAMP and self._at_timestamp_ms is not None:
            return self._at_timestamp_ms
        return int(time.time() * 1000)

    async def _create(
        self,
        shard_id: str,
        parents: tuple[str, ...],
        initial: str,
        hash_range: tuple[str, str] = ("", ""),
    ) -> Lease:
        sent = time.monotonic()
        lease = Lease(shard_id, initial, self.owner, 1, parents, confirmed_at=sent)
        item: dict[str, Any] = {
            "leaseKey": {"S": shard_id},
            "leaseOwner": {"S": self.owner},
            "leaseCounter": {"N": "1"},
            "checkpoint": {"S": initial},
            "checkpointSubSequenceNumber": {"N": "0"},
            "ownerSwitchesSinceCheckpoint": {"N": "0"},
        }
        if parents:
            item["parentShardId"] = {"SS": list(parents)}
        if hash_range[0] and hash_range[1]:
            item["startingHashKey"] = {"S": hash_range[0]}
            item["endingHashKey"] = {"S": hash_range[1]}
        if initial in MOMENT_SENTINELS:
            lease.starting_ms = self._moment_ms(initial)
            item["startingTimestamp"] = {"N": str(lease.starting_ms)}
        await self._client.put_item(
            TableName=self.table_name,
            Item=item,
            ConditionExpression="attribute_not_exists(leaseKey)",
        )
        return lease

    async def _take(self, lease: Lease) -> Lease:
        """Take `lease` (as read) over, conditional on its counter not having moved since.

        A lease still at LATEST or AT_TIMESTAMP gets its starting moment now if it has none
        (created by KCL or an older version): from here on, nobody skips what arrives."""
        switches = lease.owner_switches + (0 if lease.owner == self.owner else 1)
        # A take ends any hand-off still pending on the lease (KCL 3 clears it on take too).
        expression = (
            "SET leaseOwner = :me, leaseCounter = :next, ownerSwitchesSinceCheckpoint = :switches"
        )
        values = {
            ":me": {"S": self.owner},
            ":next": {"N": str(lease.counter + 1)},
            ":seen": {"N": str(lease.counter)},
            ":switches": {"N": str(switches)},
        }
        starting_ms = lease.starting_ms
        if lease.at_moment:
            starting_ms = (
                starting_ms if starting_ms is not None else self._moment_ms(lease.checkpoint)
            )
            expression += ", startingTimestamp = if_not_exists(startingTimestamp, :start)"
            values[":start"] = {"N": str(starting_ms)}
        sent = time.monotonic()
        await self._client.update_item(
            TableName=self.table_name,
            Key={"leaseKey": {"S": lease.shard_id}},
            UpdateExpression=expression + " REMOVE checkpointOwner",
            ConditionExpression="leaseCounter = :seen",
            ExpressionAttributeValues=values,
        )
        lease.checkpoint_owner = None
        # The condition held, so the table still had what we read: a starting moment read
        # with the lease was recorded by an earlier tenure.
        lease.starting_inherited = lease.starting_ms is not None
        lease.starting_ms = starting_ms
        lease.owner, lease.counter, lease.owner_switches = self.owner, lease.counter + 1, switches
        lease.confirmed_at = sent
        return lease

    async def hand_over(self, lease: Lease) -> bool:
        """Ask the owner of `lease` (as scanned) to hand it to this worker, as KCL 3 does: this
        worker becomes `leaseOwner` and the old owner `checkpointOwner`, who stops reading,
        checkpoints exactly what it finished and clears `checkpointOwner`; only then does this
        worker reads. False when the lease moved since it was scanned."""
        try:
            await self._client.update_item(
                TableName=self.table_name,
                Key={"leaseKey": {"S": lease.shard_id}},
                UpdateExpression="SET leaseOwner = :me, checkpointOwner = :from, "
                "leaseCounter = :next",
                ConditionExpression="leaseOwner = :from AND leaseCounter = :seen "
                "AND attribute_not_exists(checkpointOwner)",
                ExpressionAttributeValues={
                    ":me": {"S": self.owner},
                    ":from": {"S": lease.owner or ""},
                    ":next": {"N": str(lease.counter + 1)},
                    ":seen": {"N": str(lease.counter)},
                },
            )
        except ClientError as exc:
            if _is_conditional_failure(exc):
                return False
            raise
        return True

    async def checkpoint_handed(self, lease: Lease, checkpoint: str, state_ref: str | None) -> None:
        """The old owner's last word in a hand-off: its checkpoint (and state), and
        `checkpointOwner` cleared, conditional on still being the checkpoint owner (the new
        owner may have moved the counter meanwhile, so the counter is added to, not compared).
        LeaseLostError when the hand-off was given up on (timed out, taken)."""
        expression = (
            "SET #cp = :cp, checkpointSubSequenceNumber = :zero, "
            "ownerSwitchesSinceCheckpoint = :zero"
        )
        values: dict[str, Any] = {
            ":cp": {"S": checkpoint},
            ":zero": {"N": "0"},
            ":one": {"N": "1"},
            ":me": {"S": self.owner},
        }
        if state_ref is not None:
            expression += ", wildrydesStateRef = :state"
            values[":state"] = {"S": state_ref}
        try:
            await self._client.update_item(
                TableName=self.table_name,
                Key={"leaseKey": {"S": lease.shard_id}},
                UpdateExpression=expression + " ADD leaseCounter :one REMOVE checkpointOwner, "
                "pendingCheckpoint, pendingCheckpointSubSequenceNumber, pendingCheckpointState, "
                "wildrydesState",
                ConditionExpression="checkpointOwner = :me",
                ExpressionAttributeNames={"#cp": "checkpoint"},
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if _is_conditional_failure(exc):
                raise LeaseLostError(lease.shard_id) from None
            raise

    async def renew(self, lease: Lease) -> None:
        """Move the counter so other workers see the lease is alive; LeaseLostError if lost.

        Nothing is sent while another write of the lease is in flight: that one moves the
        counter too, and renewals queued behind a hung call would only pile up."""
        if lease.lock.locked():
            return

        async def write() -> None:
            if lease.owner != self.owner:
                return  # released meanwhile: a renewal now would only fail as lost
            await self._owned_update(lease, "SET leaseCounter = :next", {})
            lease.counter += 1

        await self._serialized(lease, write)

    async def checkpoint(self, lease: Lease, checkpoint: str, state_ref: str | None = None) -> None:
        """Store progress, and with it where the application's state as of that checkpoint is
        (the same conditional write, so a new owner never sees one without the other);
        LeaseLostError when this worker no longer holds the lease."""

        async def write() -> None:
            if lease.at_shard_end:
                return  # a prefix checkpoint queued behind SHARD_END must not move it back
            expression = (
                "SET #cp = :cp, checkpointSubSequenceNumber = :zero, "
                "ownerSwitchesSinceCheckpoint = :zero, leaseCounter = :next"
            )
            # KCL removes its two-phase checkpoint attributes on every checkpoint: a stale
            # pendingCheckpoint would make a KCL worker taking over resume from it.
            removed = (
                " REMOVE pendingCheckpoint, pendingCheckpointSubSequenceNumber, "
                "pendingCheckpointState, wildrydesState"
            )
            values: dict[str, Any] = {":cp": {"S": checkpoint}, ":zero": {"N": "0"}}
            if state_ref is not None:
                expression += ", wildrydesStateRef = :state"
                values[":state"] = {"S": state_ref}
            await self._owned_update(
                lease, expression + removed, values, names={"#cp": "checkpoint"}
            )
            lease.checkpoint, lease.counter, lease.owner_switches = checkpoint, lease.counter + 1, 0
            lease.subsequence = 0
            if state_ref is not None:
                lease.state_ref = state_ref

        await self._serialized(lease, write)

    async def _serialized(self, lease: Lease, write: Callable[[], Awaitable[None]]) -> None:
        """Run `write` after any earlier write to the lease, to its end even if the caller is
        cancelled (a stop cancels the checkpointer): abandoned half way, it may have moved the
        counter in the table but not in `lease`, and our next write would fail as lost."""

        async def locked() -> None:
            async with lease.lock:
                await write()

        task = asyncio.ensure_future(locked())
        # Abandoned by a cancelled or timed-out caller, its outcome is still consumed here.
        task.add_done_callback(_consume)
        await asyncio.shield(task)

    async def _owned_update(
        self,
        lease: Lease,
        expression: str,
        values: dict[str, Any],
        names: dict[str, str] | None = None,
    ) -> None:
        """An update conditional on our ownership at the counter last seen."""
        extra: dict[str, Any] = {"ExpressionAttributeNames": names} if names else {}
        sent = time.monotonic()
        params = {
            "TableName": self.table_name,
            "Key": {"leaseKey": {"S": lease.shard_id}},
            "UpdateExpression": expression,
            "ConditionExpression": "leaseOwner = :me AND leaseCounter = :seen",
            "ExpressionAttributeValues": {
                **values,
                ":me": {"S": self.owner},
                ":next": {"N": str(lease.counter + 1)},
                ":seen": {"N": str(lease.counter)},
            },
            **extra,
        }
        fast = self._fast
        try:
            if fast is None:
                await self._client.update_item(**params)
            else:
                await _retried(lambda: fast.lease_update(**params))
        except ClientError as exc:
            if _is_conditional_failure(exc):
                raise LeaseLostError(lease.shard_id) from None
            raise
        lease.confirmed_at = max(lease.confirmed_at, sent)

    async def delete_finished(self, shard_id: str) -> bool:
        """Remove a lease at SHARD_END (its shard has been trimmed away); False if it is not."""
        try:
            await self._client.delete_item(
                TableName=self.table_name,
                Key={"leaseKey": {"S": shard_id}},
                ConditionExpression="#cp = :end",
                ExpressionAttributeNames={"#cp": "checkpoint"},
                ExpressionAttributeValues={":end": {"S": SHARD_END}},
            )
        except ClientError as exc:
            if _is_conditional_failure(exc):
                return False
            raise
        return True

    async def release(self, lease: Lease) -> bool:
        """Give the lease up so another worker can take it at once; False when this worker no
        longer held it (taken, or a hand-off asked of it)."""

        async def write() -> None:
            await self._owned_update(lease, "REMOVE leaseOwner SET leaseCounter = :next", {})
            lease.owner, lease.counter = None, lease.counter + 1

        try:
            await self._serialized(lease, write)
        except LeaseLostError:
            return False
        return True


def _consume(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("abandoned lease write failed", exc_info=task.exception())


# botocore's standard retry mode, for the calls on the lean client: 5 attempts in all, with
# full-jitter backoff, for throttling, 5xx and network faults only.
LEAN_ATTEMPTS: Final = 5


async def _retried(call: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    attempt = 1
    while True:
        try:
            return await call()
        except Exception as exc:
            if attempt >= LEAN_ATTEMPTS or fault_of(exc) not in ("throttle", "transient"):
                raise
            await asyncio.sleep(backoff_delay(attempt, 0.05, 1.0))
            attempt += 1


# What the scan and reads ask for: the lease's own attributes (KCL's and this service's), never
# whatever else an item of the table may carry (the state lives in the state table).
_LEASE_ATTRIBUTES: Final = (
    "leaseKey",
    "leaseOwner",
    "leaseCounter",
    "checkpoint",
    "checkpointSubSequenceNumber",
    "ownerSwitchesSinceCheckpoint",
    "parentShardId",
    "startingTimestamp",
    "childShardIds",
    "checkpointOwner",
    "wildrydesStateRef",
    "entityType",
)
LEASE_PROJECTION: Final[dict[str, Any]] = {
    "ProjectionExpression": ", ".join(f"#a{i}" for i in range(len(_LEASE_ATTRIBUTES))),
    "ExpressionAttributeNames": {f"#a{i}": name for i, name in enumerate(_LEASE_ATTRIBUTES)},
}


def is_shard_lease(item: dict[str, Any]) -> bool:
    """A single-stream lease (its key a shard id), not another item a KCL application keeps."""
    key = item.get("leaseKey", {}).get("S", "")
    return bool(key) and ":" not in key and "entityType" not in item


def _from_item(item: dict[str, Any]) -> Lease:
    starting = item.get("startingTimestamp", {}).get("N")
    return Lease(
        shard_id=item["leaseKey"]["S"],
        checkpoint=item.get("checkpoint", {}).get("S", TRIM_HORIZON),
        owner=item.get("leaseOwner", {}).get("S"),
        counter=int(item.get("leaseCounter", {}).get("N", "0")),
        parents=tuple(sorted(item.get("parentShardId", {}).get("SS", []))),
        owner_switches=int(item.get("ownerSwitchesSinceCheckpoint", {}).get("N", "0")),
        starting_ms=int(starting) if starting is not None else None,
        subsequence=int(item.get("checkpointSubSequenceNumber", {}).get("N", "0")),
        children=tuple(sorted(item.get("childShardIds", {}).get("SS", []))),
        checkpoint_owner=item.get("checkpointOwner", {}).get("S"),
        state_ref=item.get("wildrydesStateRef", {}).get("S"),
    )
