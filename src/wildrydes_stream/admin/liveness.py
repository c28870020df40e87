"""Which lease owners are alive, judged as the workers judge it: by the counter moving.

A live owner renews every third of the lease duration, so two scans that far apart (plus a
margin) show its counters moved. An owner none of whose counters moved is not renewing.
"""

from __future__ import annotations

import asyncio

from botocore.exceptions import ClientError

from wildrydes_stream.consumer.lease import Lease
from wildrydes_stream.consumer.leases import LeaseTable

MARGIN = 0.5


async def scan_twice(
    leases: LeaseTable, lease_duration: float
) -> tuple[dict[str, Lease], set[str]]:
    """The leases as of the second scan, and the owners seen renewing between the two; none
    when the lease table does not exist yet (no consumer ever ran)."""
    try:
        first = await leases.all()
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ResourceNotFoundException":
            return {}, set()
        raise
    await asyncio.sleep(lease_duration / 3 + MARGIN)
    second = await leases.all()
    alive = {
        lease.owner
        for shard_id, lease in second.items()
        if lease.owner
        and shard_id in first
        and (first[shard_id].counter != lease.counter or first[shard_id].owner != lease.owner)
    }
    return second, alive
