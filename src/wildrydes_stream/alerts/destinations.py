"""Where low-magic alerts go: the log (always), an SNS topic, a webhook.

Each alert is one JSON object (`Alert.body`). A destination's `deliver` either delivers it or
raises; the stage retries (stage.py). A receiver may see an alert twice after a crash: the `id`
is the same both times.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from wildrydes_stream.alerts.state import AlertState
from wildrydes_stream.aws.clients import AwsClients
from wildrydes_stream.aws.retry import error_code
from wildrydes_stream.config import Settings
from wildrydes_stream.errors import WildrydesError

log = logging.getLogger(__name__)
alert_log = logging.getLogger("wildrydes_stream.alerts.log")
"""The log destination's own logger, so its lines can be routed or quieted apart from the
destinations' own troubles (`local` quiets it: it prints the alerts its webhook receives)."""

# The setting behind each destination, named in its log lines and start-up errors.
SETTING_OF = {
    "sns": "alert_sns_topic_arn (WILDRYDES_ALERT_SNS_TOPIC_ARN)",
    "webhook": "alert_webhook_url (WILDRYDES_ALERT_WEBHOOK_URL)",
    "log": "log_level (WILDRYDES_LOG_LEVEL)",
}
NAMES = ("log", "sns", "webhook")


@dataclass(frozen=True, slots=True)
class Alert:
    name: str
    status_time: str
    """As the record had it: `YYYY-MM-DD HH:MM:SS.mmm`, UTC."""
    epoch_ms: int
    min_magic_points: int | Decimal
    threshold: int
    state: AlertState

    @property
    def id(self) -> str:
        """The unicorn, the minute of the crossing and the state: a replay of the same record
        gives the same id, so a receiver can drop the repeat."""
        minute = datetime.fromtimestamp(self.epoch_ms // 60000 * 60, UTC)
        return f"{self.name}:{minute:%Y-%m-%dT%H:%MZ}:{self.state}"

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "name": self.name,
            "status_time": self.status_time,
            "min_magic_points": _number(self.min_magic_points),
            "threshold": self.threshold,
        }

    def json(self) -> str:
        return json.dumps(self.body(), separators=(",", ":"), ensure_ascii=False)


class Destination(Protocol):
    name: str
    """Metric label: log, sns or webhook."""

    async def check(self) -> None:
        """At start: fail with one line naming the setting if the destination is unusable."""

    async def deliver(self, alert: Alert) -> None:
        """Deliver the alert or raise."""

    async def close(self) -> None: ...


class LogDestination:
    """One WARNING line per firing alert, INFO per resolved one, with the alert's fields."""

    name = "log"

    async def check(self) -> None:
        return None

    async def deliver(self, alert: Alert) -> None:
        level = logging.WARNING if alert.state == "firing" else logging.INFO
        what = "low on magic" if alert.state == "firing" else "magic recovered"
        alert_log.log(level, "unicorn %s: %s", what, alert.name, extra={"alert": alert.body()})

    async def close(self) -> None:
        return None


class SnsDestination:
    """Publish, one message per alert (the alert's JSON), with its state as a message
    attribute for subscription filters. A FIFO topic also deduplicates by the alert's id."""

    name = "sns"

    def __init__(self, client: Any, topic_arn: str) -> None:
        self._client = client
        self._topic_arn = topic_arn
        self._fifo = topic_arn.endswith(".fifo")

    async def check(self) -> None:
        try:
            await self._client.get_topic_attributes(TopicArn=self._topic_arn)
        except (BotoCoreError, ClientError) as exc:
            cause = f"{error_code(exc)}: {exc}" if error_code(exc) else str(exc)
            raise WildrydesError(
                f"SNS topic {self._topic_arn} cannot be used ({cause}): set "
                f"{SETTING_OF['sns']} to an existing topic this role may publish to"
            ) from None

    async def deliver(self, alert: Alert) -> None:
        extra: dict[str, Any] = {}
        if self._fifo:
            extra = {"MessageGroupId": alert.name, "MessageDeduplicationId": _dedup_id(alert)}
        await self._client.publish(
            TopicArn=self._topic_arn,
            Message=alert.json(),
            MessageAttributes={"state": {"DataType": "String", "StringValue": alert.state}},
            **extra,
        )

    async def close(self) -> None:
        return None


class WebhookRefused(Exception):
    """The webhook answered with a status other than 2xx."""


class WebhookDestination:
    """HTTP POST of the alert's JSON; any 2xx answer means delivered. `Idempotency-Key`
    carries the alert's id, for receivers that drop repeats by header."""

    name = "webhook"

    def __init__(self, url: str) -> None:
        self._url = url
        self._session: aiohttp.ClientSession | None = None

    async def check(self) -> None:
        """The URL's form is checked with the settings; whether it answers is not: a receiver
        that is down at start is retried like one that goes down later."""

    async def deliver(self, alert: Alert) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Content-Type": "application/json", "Idempotency-Key": alert.id}
        async with self._session.post(self._url, data=alert.json().encode(), headers=headers) as r:
            if not 200 <= r.status < 300:
                raise WebhookRefused(f"HTTP {r.status} from {self._url}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def destinations(settings: Settings, clients: AwsClients) -> list[Destination]:
    """The log, and every destination the settings enable."""
    chosen: list[Destination] = [LogDestination()]
    if settings.alert_sns_topic_arn:
        chosen.append(SnsDestination(clients.sns, settings.alert_sns_topic_arn))
    if settings.alert_webhook_url:
        chosen.append(WebhookDestination(settings.alert_webhook_url))
    return chosen


def _number(value: int | Decimal) -> int | float:
    """As JSON: a whole number stays an integer (`47`, not `47.0`)."""
    if isinstance(value, int) or value != value.to_integral_value():
        return value if isinstance(value, int) else float(value)
    return int(value)


def _dedup_id(alert: Alert) -> str:
    # MessageDeduplicationId: up to 128 characters of [A-Za-z0-9] and punctuation; the name
    # may hold anything, so the id is hashed.
    return hashlib.sha256(alert.id.encode()).hexdigest()
