"""Tables the service keeps for itself (leases, application state): created on demand when
missing, as KCL creates its lease table."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from botocore.exceptions import ClientError

log = logging.getLogger(__name__)


async def ensure_table(
    client: Any, table_name: str, keys: list[tuple[str, str]], what: str
) -> None:
    """Create `table_name` (on-demand capacity) with string `keys` [(name, HASH|RANGE)] when
    missing, and wait until it is ACTIVE. `what` names it in the log and errors."""
    try:
        described = await client.describe_table(TableName=table_name)
        if described["Table"]["TableStatus"] == "ACTIVE":
            return
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
    # Missing, or being created by a replica that started at the same moment (then the
    # create below says ResourceInUse): either way, wait until it is ACTIVE.
    log.info("creating %s", what, extra={"table": table_name})
    try:
        await client.create_table(
            TableName=table_name,
            AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"} for n, _ in keys],
            KeySchema=[{"AttributeName": n, "KeyType": kind} for n, kind in keys],
            BillingMode="PAY_PER_REQUEST",
        )
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceInUseException":
            raise
    for _ in range(600):
        described = await client.describe_table(TableName=table_name)
        if described["Table"]["TableStatus"] == "ACTIVE":
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{what} {table_name} did not become ACTIVE")
