"""`run`: the consumer that copies aggregates into the DynamoDB table.

Records decode to table items (records.py) and go to the batched BatchWriteItem writers
(sink/dynamodb.py); at start the table must exist with the key schema the settings write.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry

from wildrydes_stream.aws import AwsClients
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer import FINAL_CHECKPOINT_TIMEOUT, Consumer, Wiring
from wildrydes_stream.errors import MissingResourceError, WildrydesError
from wildrydes_stream.records import Item, ItemKey, decode_item
from wildrydes_stream.schema import table_problems
from wildrydes_stream.sink.dynamodb import WriterPool
from wildrydes_stream.source.poller import ShardState

__all__ = ["FINAL_CHECKPOINT_TIMEOUT", "Service", "TableCopy"]


class TableCopy:
    """Each record becomes one item of `table_name`."""

    state: ShardState | None = None

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._format = settings.status_time_format
        self.pool: WriterPool | None = None

    def decode(self, data: bytes) -> tuple[ItemKey, Item]:
        return decode_item(data, self._format)

    async def check(self, clients: AwsClients) -> None:
        s = self._settings
        try:
            table = await clients.dynamodb_control.describe_table(TableName=s.table_name)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ResourceNotFoundException":
                raise MissingResourceError(
                    f"DynamoDB table {s.table_name!r} does not exist: create it or set "
                    "table_name (WILDRYDES_TABLE_NAME)"
                ) from None
            raise
        _check_sort_key(table["Table"], s)

    def sink(self, wiring: Wiring) -> WriterPool:
        self.pool = WriterPool(
            wiring.clients.dynamodb_data,
            wiring.settings,
            wiring.deadletters,
            wiring.metrics,
            wiring.on_failure,
            blocked=wiring.blocked,
            budget=wiring.budget,
        )
        return self.pool


class Service(Consumer):
    """The `run` service: the consumer core with the table copy."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.table_copy = TableCopy(settings)
        super().__init__(settings, self.table_copy, registry)

    @property
    def pool(self) -> WriterPool | None:
        return self.table_copy.pool


def _check_sort_key(table: dict[str, Any], settings: Settings) -> None:
    """Refuse to start when the table's keys disagree with what the settings write."""
    problems = table_problems(table, settings)
    if problems:
        raise WildrydesError(problems[0])
