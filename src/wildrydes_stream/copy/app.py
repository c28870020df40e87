"""`run`: the consumer that copies aggregates into the DynamoDB table, with low-magic alerts.

Records decode to table items (records.py); each is evaluated by the alert stage (alerts/) in
shard order and goes to the batched BatchWriteItem writers (sink/dynamodb.py). At start the
table must exist with the key schema the settings write, and the alert destinations be usable.
The per-unicorn alert state is the application's per-shard state: it moves with the leases.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry

from wildrydes_stream.alerts.destinations import destinations
from wildrydes_stream.alerts.metrics import AlertMetrics
from wildrydes_stream.alerts.stage import AlertingSink, AlertStage
from wildrydes_stream.alerts.state import UnicornStates
from wildrydes_stream.aws.clients import AwsClients
from wildrydes_stream.config import Settings
from wildrydes_stream.consumer.core import FINAL_CHECKPOINT_TIMEOUT, Consumer, Wiring
from wildrydes_stream.consumer.state import ShardState
from wildrydes_stream.copy.item import decode_item
from wildrydes_stream.copy.schema import table_problems
from wildrydes_stream.errors import MissingResourceError, WildrydesError
from wildrydes_stream.records.envelope import Item, ItemKey
from wildrydes_stream.sink.dynamodb import WriterPool

__all__ = ["FINAL_CHECKPOINT_TIMEOUT", "Service", "TableCopy"]


class TableCopy:
    """Each record becomes one item of `table_name`; a unicorn's magic falling below
    `alert_magic_threshold` (and recovering) raises an alert."""

    name = "run"
    state: ShardState | None

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._format = settings.status_time_format
        self.pool: WriterPool | None = None
        self.alerts: AlertStage | None = None
        self.unicorns = UnicornStates(settings.alert_magic_threshold)
        self.state = self.unicorns

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
        for destination in destinations(s, clients):
            await destination.check()

    def sink(self, wiring: Wiring) -> AlertingSink:
        self.pool = WriterPool(
            wiring.clients.dynamodb_data,
            wiring.settings,
            wiring.deadletters,
            wiring.metrics,
            wiring.on_failure,
            blocked=wiring.blocked,
            budget=wiring.budget,
        )
        s = wiring.settings
        chosen = destinations(s, wiring.clients)
        metrics = AlertMetrics(
            wiring.metrics.registry, [d.name for d in chosen], s.alert_max_unicorns_tracked
        )
        self.alerts = AlertStage(
            self.unicorns, chosen, metrics, s, wiring.on_failure, wiring.deadletters
        )
        return AlertingSink(self.pool, self.alerts)


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
