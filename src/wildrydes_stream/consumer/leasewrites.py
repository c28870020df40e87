"""Writes to a lease this worker holds: conditional on owning it at the counter last seen, one
at a time per lease, and carried to their end even when the caller gives up.

Two replicas can never both advance one shard: every write after taking a lease names the
owner and the counter it last saw, and a refused condition is the lease lost (LeaseLostError).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from botocore.exceptions import ClientError

from wildrydes_stream.aws.lean import DynamoDBData
from wildrydes_stream.aws.retry import backoff_delay, fault_of
from wildrydes_stream.consumer.lease import Lease
from wildrydes_stream.errors import LeaseLostError

log = logging.getLogger(__name__)


def is_conditional_failure(exc: ClientError) -> bool:
    return bool(exc.response["Error"]["Code"] == "ConditionalCheckFailedException")


class OwnedWrites:
    def __init__(self, client: Any, table_name: str, owner: str, fast: DynamoDBData | None) -> None:
        self._client = client
        self._table_name = table_name
        self._owner = owner
        self._fast = fast

    async def serialized(self, lease: Lease, write: Callable[[], Awaitable[None]]) -> None:
        """Run `write` after any earlier write to the lease, to its end even if the caller is
        cancelled (a stop cancels the checkpointer): abandoned half way, it may have moved the
        counter in the table but not in `lease`, and our next write would fail as lost."""
        await asyncio.shield(self.start(lease, write))

    def start(self, lease: Lease, write: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """`serialized` without waiting: the write as a task that runs to its end whoever
        waits for it, its outcome consumed even when nobody does."""

        async def locked() -> None:
            async with lease.lock:
                await write()

        task = asyncio.ensure_future(locked())
        # Abandoned by a cancelled or timed-out caller, its outcome is still consumed here.
        task.add_done_callback(_consume)
        return task

    async def update(
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
            "TableName": self._table_name,
            "Key": {"leaseKey": {"S": lease.shard_id}},
            "UpdateExpression": expression,
            "ConditionExpression": "leaseOwner = :me AND leaseCounter = :seen",
            "ExpressionAttributeValues": {
                **values,
                ":me": {"S": self._owner},
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
                await retried(lambda: fast.lease_update(**params))
        except ClientError as exc:
            if is_conditional_failure(exc):
                raise LeaseLostError(lease.shard_id) from None
            raise
        lease.confirmed_at = max(lease.confirmed_at, sent)


def _consume(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("abandoned lease write failed", exc_info=task.exception())


# botocore's standard retry mode, for the calls on the lean client: 5 attempts in all, with
# full-jitter backoff, for throttling, 5xx and network faults only.
LEAN_ATTEMPTS: Final = 5


async def retried(call: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    attempt = 1
    while True:
        try:
            return await call()
        except Exception as exc:
            if attempt >= LEAN_ATTEMPTS or fault_of(exc) not in ("throttle", "transient"):
                raise
            await asyncio.sleep(backoff_delay(attempt, 0.05, 1.0))
            attempt += 1
