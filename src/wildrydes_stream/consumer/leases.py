"""The lease table, in the layout of the Kinesis Client Library's (the item: consumer/lease.py).

Reads (every lease at once, projected to the lease's attributes), creation and taking over,
the hand-off request, and the writes of a worker holding a lease (renewal, checkpoint, release),
which go through consumer/leasewrites.py: conditional on ownership, one at a time per lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from botocore.exceptions import ClientError

from wildrydes_stream.aws.lean import DynamoDBData
from wildrydes_stream.aws.tables import ensure_table
from wildrydes_stream.consumer.lease import (
    AT_TIMESTAMP,
    LEASE_PROJECTION,
    MOMENT_SENTINELS,
    SHARD_END,
    Lease,
    is_shard_lease,
    lease_from_item,
)
from wildrydes_stream.consumer.leasewrites import OwnedWrites, is_conditional_failure, retried
from wildrydes_stream.errors import LeaseLostError


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
        self._writes = OwnedWrites(client, table_name, owner, fast)

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
        return lease_from_item(item) if item else None

    async def all(self) -> dict[str, Lease]:
        """Every lease of this stream's shards. Other items a KCL application may keep in the
        table (multi-stream leases `account:stream:epoch:shardId`, KCL 3 `entityType` items)
        are skipped: never read as shards, never deleted."""
        leases: dict[str, Lease] = {}
        async for items in self._scan():
            for item in items:
                if not is_shard_lease(item):
                    continue
                lease = lease_from_item(item)
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
            page = await retried(lambda: fast.lease_scan(**params))
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
            if not is_conditional_failure(exc):
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
                if not is_conditional_failure(exc):
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
            if is_conditional_failure(exc):
                return False
            raise
        return True

    async def checkpoint_handed(
        self, lease: Lease, checkpoint: str, state_ref: str | None, subsequence: int = 0
    ) -> None:
        """The old owner's last word in a hand-off: its checkpoint (and state), and
        `checkpointOwner` cleared, conditional on still being the checkpoint owner (the new
        owner may have moved the counter meanwhile, so the counter is added to, not compared).
        LeaseLostError when the hand-off was given up on (timed out, taken)."""
        expression = (
            "SET #cp = :cp, checkpointSubSequenceNumber = :sub, "
            "ownerSwitchesSinceCheckpoint = :zero"
        )
        values: dict[str, Any] = {
            ":cp": {"S": checkpoint},
            ":sub": {"N": str(subsequence)},
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
            if is_conditional_failure(exc):
                raise LeaseLostError(lease.shard_id) from None
            raise

    async def renew(self, lease: Lease) -> None:
        """Move the counter so other workers see the lease is alive; LeaseLostError if lost.

        Nothing is sent while another write of the lease is in flight: that one moves the
        counter too, and renewals queued behind a hung call would only pile up."""
        task = self.start_renewal(lease)
        if task is not None:
            await asyncio.shield(task)

    def start_renewal(self, lease: Lease) -> asyncio.Task[None] | None:
        """`renew` as a task that runs to its end whoever waits for it (None: another write
        is in flight), so a round of renewals is one task a lease and one wait for them all."""
        if lease.lock.locked():
            return None

        async def write() -> None:
            if lease.owner != self.owner:
                return  # released meanwhile: a renewal now would only fail as lost
            await self._writes.update(lease, "SET leaseCounter = :next", {})
            lease.counter += 1

        return self._writes.start(lease, write)

    async def checkpoint(
        self,
        lease: Lease,
        checkpoint: str,
        state_ref: str | None = None,
        subsequence: int = 0,
    ) -> None:
        """Store progress (a sequence number and, inside a KPL aggregate, the index of the last
        finished user record), and with it where the application's state as of that
        checkpoint is (the same conditional write, so a new owner never sees one without the
        other); LeaseLostError when this worker no longer holds the lease."""

        async def write() -> None:
            if lease.at_shard_end:
                return  # a prefix checkpoint queued behind SHARD_END must not move it back
            expression = (
                "SET #cp = :cp, checkpointSubSequenceNumber = :sub, "
                "ownerSwitchesSinceCheckpoint = :zero, leaseCounter = :next"
            )
            # KCL removes its two-phase checkpoint attributes on every checkpoint: a stale
            # pendingCheckpoint would make a KCL worker taking over resume from it.
            removed = (
                " REMOVE pendingCheckpoint, pendingCheckpointSubSequenceNumber, "
                "pendingCheckpointState, wildrydesState"
            )
            values: dict[str, Any] = {
                ":cp": {"S": checkpoint},
                ":sub": {"N": str(subsequence)},
                ":zero": {"N": "0"},
            }
            if state_ref is not None:
                expression += ", wildrydesStateRef = :state"
                values[":state"] = {"S": state_ref}
            await self._writes.update(
                lease, expression + removed, values, names={"#cp": "checkpoint"}
            )
            lease.checkpoint, lease.counter, lease.owner_switches = checkpoint, lease.counter + 1, 0
            lease.subsequence = subsequence
            if state_ref is not None:
                lease.state_ref = state_ref

        await self._writes.serialized(lease, write)

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
            if is_conditional_failure(exc):
                return False
            raise
        return True

    async def release(self, lease: Lease) -> bool:
        """Give the lease up so another worker can take it at once; False when this worker no
        longer held it (taken, or a hand-off asked of it)."""

        async def write() -> None:
            await self._writes.update(lease, "REMOVE leaseOwner SET leaseCounter = :next", {})
            lease.owner, lease.counter = None, lease.counter + 1

        try:
            await self._writes.serialized(lease, write)
        except LeaseLostError:
            return False
        return True
