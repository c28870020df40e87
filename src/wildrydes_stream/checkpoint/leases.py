"""The lease table, in the layout of the Kinesis Client Library's.

One item per shard: `leaseKey` (shard id), `leaseOwner`, `leaseCounter`, `checkpoint` (a
sequence number or a sentinel), `checkpointSubSequenceNumber`, `ownerSwitchesSinceCheckpoint`
and `parentShardId` (string set). Every write after taking a lease is conditional on this worker
still owning it at the counter it last saw, so two replicas can never both advance one shard.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from botocore.exceptions import ClientError

from wildrydes_stream.errors import LeaseLostError

log = logging.getLogger(__name__)

SHARD_END: Final = "SHARD_END"
TRIM_HORIZON: Final = "TRIM_HORIZON"


@dataclass(slots=True)
class Lease:
    shard_id: str
    checkpoint: str
    owner: str | None
    counter: int
    parents: tuple[str, ...] = ()
    owner_switches: int = 0

    @property
    def at_shard_end(self) -> bool:
        return self.checkpoint == SHARD_END


def _is_conditional_failure(exc: ClientError) -> bool:
    return bool(exc.response["Error"]["Code"] == "ConditionalCheckFailedException")


class LeaseTable:
    def __init__(self, client: Any, table_name: str, owner: str) -> None:
        self._client = client
        self.table_name = table_name
        self.owner = owner
        # One write at a time per lease: checkpoint, renewal and release all move the counter
        # they are conditional on, so two in flight would make the second look like a loss.
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def ensure_table(self) -> None:
        """Create the table (on-demand capacity) when missing and wait until it is active."""
        try:
            await self._client.describe_table(TableName=self.table_name)
            return
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceNotFoundException":
                raise
        log.info("creating lease table", extra={"table": self.table_name})
        try:
            await self._client.create_table(
                TableName=self.table_name,
                AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}],
                BillingMode="PAY_PER_REQUEST",
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceInUseException":
                raise
        for _ in range(600):
            described = await self._client.describe_table(TableName=self.table_name)
            if described["Table"]["TableStatus"] == "ACTIVE":
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"lease table {self.table_name} did not become ACTIVE")

    async def get(self, shard_id: str) -> Lease | None:
        response = await self._client.get_item(
            TableName=self.table_name, Key={"leaseKey": {"S": shard_id}}, ConsistentRead=True
        )
        item = response.get("Item")
        return _from_item(item) if item else None

    async def all(self) -> dict[str, Lease]:
        leases: dict[str, Lease] = {}
        paginator = self._client.get_paginator("scan")
        async for page in paginator.paginate(TableName=self.table_name, ConsistentRead=True):
            for item in page.get("Items", []):
                lease = _from_item(item)
                leases[lease.shard_id] = lease
        return leases

    async def acquire(
        self,
        shard_id: str,
        parents: tuple[str, ...],
        initial: str,
        takeable: Callable[[Lease], bool],
    ) -> Lease | None:
        """Create the shard's lease owned by us, or take the existing one over if `takeable`.

        None when another worker holds it and `takeable` says it may not be taken.
        """
        for _ in range(10):
            existing = await self.get(shard_id)
            try:
                if existing is None:
                    return await self._create(shard_id, parents, initial)
                if not takeable(existing):
                    return None
                return await self._take(existing)
            except ClientError as exc:
                if not _is_conditional_failure(exc):
                    raise
                # Someone changed it between our read and write: read again.
        raise LeaseLostError(shard_id)

    async def _create(self, shard_id: str, parents: tuple[str, ...], initial: str) -> Lease:
        lease = Lease(shard_id, initial, self.owner, 1, parents)
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
        await self._client.put_item(
            TableName=self.table_name,
            Item=item,
            ConditionExpression="attribute_not_exists(leaseKey)",
        )
        return lease

    async def _take(self, lease: Lease) -> Lease:
        switches = lease.owner_switches + (0 if lease.owner == self.owner else 1)
        await self._client.update_item(
            TableName=self.table_name,
            Key={"leaseKey": {"S": lease.shard_id}},
            UpdateExpression="SET leaseOwner = :me, leaseCounter = :next, "
            "ownerSwitchesSinceCheckpoint = :switches",
            ConditionExpression="leaseCounter = :seen",
            ExpressionAttributeValues={
                ":me": {"S": self.owner},
                ":next": {"N": str(lease.counter + 1)},
                ":seen": {"N": str(lease.counter)},
                ":switches": {"N": str(switches)},
            },
        )
        lease.owner, lease.counter, lease.owner_switches = self.owner, lease.counter + 1, switches
        return lease

    async def renew(self, lease: Lease) -> None:
        """Move the counter so other workers see the lease is alive; LeaseLostError if lost."""

        async def write() -> None:
            await self._owned_update(lease, "SET leaseCounter = :next", {})
            lease.counter += 1

        await self._serialized(lease, write)

    async def checkpoint(self, lease: Lease, checkpoint: str) -> None:
        """Store progress; LeaseLostError when this worker no longer holds the lease."""

        async def write() -> None:
            if lease.at_shard_end:
                return  # a prefix checkpoint queued behind SHARD_END must not move it back
            await self._owned_update(
                lease,
                "SET #cp = :cp, checkpointSubSequenceNumber = :zero, "
                "ownerSwitchesSinceCheckpoint = :zero, leaseCounter = :next",
                {":cp": {"S": checkpoint}, ":zero": {"N": "0"}},
                names={"#cp": "checkpoint"},
            )
            lease.checkpoint, lease.counter, lease.owner_switches = checkpoint, lease.counter + 1, 0

        await self._serialized(lease, write)

    async def _serialized(self, lease: Lease, write: Callable[[], Awaitable[None]]) -> None:
        """Run `write` after any earlier write to the lease, to its end even if the caller is
        cancelled (a stop cancels the checkpointer): abandoned half way, it may have moved the
        counter in the table but not in `lease`, and our next write would fail as lost."""

        async def locked() -> None:
            async with self._locks[lease.shard_id]:
                await write()

        await asyncio.shield(locked())

    async def _owned_update(
        self,
        lease: Lease,
        expression: str,
        values: dict[str, Any],
        names: dict[str, str] | None = None,
    ) -> None:
        """An update conditional on our ownership at the counter last seen."""
        extra: dict[str, Any] = {"ExpressionAttributeNames": names} if names else {}
        try:
            await self._client.update_item(
                TableName=self.table_name,
                Key={"leaseKey": {"S": lease.shard_id}},
                UpdateExpression=expression,
                ConditionExpression="leaseOwner = :me AND leaseCounter = :seen",
                ExpressionAttributeValues={
                    **values,
                    ":me": {"S": self.owner},
                    ":next": {"N": str(lease.counter + 1)},
                    ":seen": {"N": str(lease.counter)},
                },
                **extra,
            )
        except ClientError as exc:
            if _is_conditional_failure(exc):
                raise LeaseLostError(lease.shard_id) from None
            raise

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

    async def release(self, lease: Lease) -> None:
        """Give the lease up so another worker can take it at once."""

        async def write() -> None:
            await self._owned_update(lease, "REMOVE leaseOwner SET leaseCounter = :next", {})
            lease.owner, lease.counter = None, lease.counter + 1

        try:
            await self._serialized(lease, write)
        except LeaseLostError:
            log.warning("lease already taken on release", extra={"shard": lease.shard_id})


def _from_item(item: dict[str, Any]) -> Lease:
    return Lease(
        shard_id=item["leaseKey"]["S"],
        checkpoint=item.get("checkpoint", {}).get("S", TRIM_HORIZON),
        owner=item.get("leaseOwner", {}).get("S"),
        counter=int(item.get("leaseCounter", {}).get("N", "0")),
        parents=tuple(sorted(item.get("parentShardId", {}).get("SS", []))),
        owner_switches=int(item.get("ownerSwitchesSinceCheckpoint", {}).get("N", "0")),
    )
