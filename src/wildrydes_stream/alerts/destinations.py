"""Where low-magic alerts go: the log (always), an SNS topic, a webhook.

Each alert is one JSON object (`Alert.body`). A destination's `deliver` either delivers it or
raises: `AlertRefused` when the destination refused this alert for itself (the stage
dead-letters its record and moves on), anything else is retried (stage.py). A receiver may see
an alert twice after a crash: the `id` is the same both times.

A unicorn's name is any JSON string (spaces, CR/LF, any script, any length). It travels whole
only in the JSON body; headers, message attributes and FIFO group and deduplication ids carry
`ascii_token`s derived from it, and log messages a printable excerpt. The webhook URL may
carry a secret in its path: logs and errors show its scheme and host only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from wildrydes_stream.alerts.state import AlertState
from wildrydes_stream.aws.clients import AwsClients
from wildrydes_stream.aws.retry import describe_error, error_code
from wildrydes_stream.config import Settings, redact_url
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

# Printable ASCII but space: what an SNS FIFO MessageGroupId may hold (a-z, A-Z, 0-9 and
# !"#$%&'()*+,-./:;<=>?@[\]^_`{|}~, up to 128 characters), and safe in an HTTP header value.
TOKEN_CHARACTERS = frozenset(chr(c) for c in range(0x21, 0x7F))
TOKEN_LENGTH = 128
_MARK = "~"
"""Separates a derived token's readable prefix from its hash; never in a name kept as is."""
_HASH_HEX = 32  # 128 bits of SHA-256

# SNS refused the request for what it holds (a parameter), not for who sent it or where to:
# the same alert would be refused again. AuthorizationError, NotFound, KMS*, throttling and
# 5xx are the operator's or transient, and are retried.
SNS_REFUSAL_CODES = frozenset(
    {
        "InvalidParameter",
        "InvalidParameterException",
        "InvalidParameterValue",
        "ParameterValueInvalid",
        "ValidationError",
        "ValidationException",
    }
)
# 4xx answers of a webhook that are not about the alert: throttling and timeouts (408, 425,
# 429) clear by themselves; a wrong or revoked URL or credentials (401, 403, 404, 405, 407,
# 410, 421, 426) need the operator. Both are retried; every other 4xx refuses the alert itself.
WEBHOOK_RETRIED_4XX = frozenset({401, 403, 404, 405, 407, 408, 410, 421, 425, 426, 429})


class AlertRefused(Exception):
    """The destination refused this alert for itself: sending it again would be refused
    again. The message says how (`HTTP 400: ...`, `InvalidParameter: ...`), one line."""


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
        return self._id_of(self.name)

    @property
    def key(self) -> str:
        """The id with the name as an `ascii_token`: the id itself for a plain name, and at
        most 128 printable ASCII characters for any name, for headers."""
        return self._id_of(ascii_token(self.name, TOKEN_LENGTH - 27))

    @property
    def group_id(self) -> str:
        """The unicorn as an SNS FIFO MessageGroupId: one group per unicorn (its alerts stay in
        order), its name itself when that is allowed."""
        return ascii_token(self.name, TOKEN_LENGTH)

    @property
    def deduplication_id(self) -> str:
        """The id as an SNS FIFO MessageDeduplicationId: 64 hex digits."""
        return _sha256(self.id)

    def _id_of(self, name: str) -> str:
        minute = datetime.fromtimestamp(self.epoch_ms // 60000 * 60, UTC)
        return f"{name}:{minute:%Y-%m-%dT%H:%MZ}:{self.state}"

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
        """The body as compact JSON, non-ASCII as is; all ASCII (escaped) when the name holds a
        lone surrogate, which JSON may carry but UTF-8 cannot."""
        body = self.body()
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        try:
            text.encode()
        except UnicodeEncodeError:
            return json.dumps(body, separators=(",", ":"))
        return text


class Destination(Protocol):
    name: str
    """Metric label: log, sns or webhook."""

    async def check(self) -> None:
        """At start: fail with one line naming the setting if the destination is unusable."""

    async def deliver(self, alert: Alert) -> None:
        """Deliver the alert or raise: `AlertRefused` if this alert itself is refused (not
        retried), anything else for a failure that is retried."""

    async def close(self) -> None: ...


class LogDestination:
    """One WARNING line per firing alert, INFO per resolved one, with the alert's fields."""

    name = "log"

    async def check(self) -> None:
        return None

    async def deliver(self, alert: Alert) -> None:
        level = logging.WARNING if alert.state == "firing" else logging.INFO
        what = "low on magic" if alert.state == "firing" else "magic recovered"
        name = printable(alert.name)
        alert_log.log(level, "unicorn %s: %s", what, name, extra={"alert": alert.body()})

    async def close(self) -> None:
        return None


class SnsDestination:
    """Publish, one message per alert (the alert's JSON), with its state as a message
    attribute for subscription filters. On a FIFO topic each unicorn is a message group and
    the alert's id (hashed) its deduplication id. A parameter SNS refuses is `AlertRefused`."""

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
            extra = {
                "MessageGroupId": alert.group_id,
                "MessageDeduplicationId": alert.deduplication_id,
            }
        try:
            await self._client.publish(
                TopicArn=self._topic_arn,
                Message=alert.json(),
                MessageAttributes={"state": {"DataType": "String", "StringValue": alert.state}},
                **extra,
            )
        except ParamValidationError as exc:  # refused before it was sent
            raise AlertRefused(printable(describe_error(exc))) from exc
        except ClientError as exc:
            if error_code(exc) in SNS_REFUSAL_CODES:
                raise AlertRefused(printable(describe_error(exc))) from exc
            raise

    async def close(self) -> None:
        return None


class WebhookError(Exception):
    """The webhook failed in a way worth retrying (5xx, throttling, a wrong URL, the network).
    The message names the URL by scheme and host only."""


class WebhookDestination:
    """HTTP POST of the alert's JSON; any 2xx answer means delivered, a 4xx that is about the
    alert (400, 413, 422, ...: not `WEBHOOK_RETRIED_4XX`) is `AlertRefused`, anything else is
    retried. `Idempotency-Key` carries the alert's `key` (its id, for a plain name), for
    receivers that drop repeats by header."""

    name = "webhook"

    def __init__(self, url: str) -> None:
        self._url = url
        self.shown_url = redact_url(url)
        """The URL as log lines and errors may show it: scheme and host."""
        self._session: aiohttp.ClientSession | None = None

    async def check(self) -> None:
        """The URL's form is checked with the settings; whether it answers is not: a receiver
        that is down at start is retried like one that goes down later."""

    async def deliver(self, alert: Alert) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Content-Type": "application/json", "Idempotency-Key": alert.key}
        data = alert.json().encode()
        try:
            async with self._session.post(self._url, data=data, headers=headers) as response:
                status = response.status
                if 200 <= status < 300:
                    return
                said = await _excerpt(response) if 400 <= status < 500 else ""
        except Exception as exc:
            # aiohttp's errors may quote the whole URL, secret path included.
            text = self._scrub(f"{type(exc).__name__}: {exc}")
            raise WebhookError(f"{text} ({self.shown_url})") from None
        if 400 <= status < 500 and status not in WEBHOOK_RETRIED_4XX:
            raise AlertRefused(f"HTTP {status}{': ' + said if said else ''}")
        raise WebhookError(f"HTTP {status} from {self.shown_url}")

    def _scrub(self, text: str) -> str:
        """`text` without the URL's path, query or user info: as configured, and in any URL
        the text quotes (aiohttp's errors quote the request's URL, percent-encoded)."""
        parts = urllib.parse.urlsplit(self._url)
        secrets = {
            self._url,
            parts.path + (f"?{parts.query}" if parts.query else ""),
            parts.netloc.rpartition("@")[0],
        }
        for secret in sorted(secrets - {"", "/"}, key=len, reverse=True):
            text = text.replace(secret, "…")
        return printable(_URL_TAIL.sub(r"\1\2/…", text), 300)

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


_URL_TAIL = re.compile(r"([a-z][a-z0-9+.-]*://)(?:[^/@\s'\"]*@)?([^/\s'\"]+)/[^\s'\")]+", re.I)


def ascii_token(text: str, limit: int) -> str:
    """`text` as at most `limit` (>= 34) characters of `TOKEN_CHARACTERS`: `text` itself when
    it is that already and holds no `~`; else a readable ASCII prefix of it (accents dropped,
    other characters as `_`), `~` and 32 hex digits of its SHA-256. Distinct texts give
    distinct tokens: a kept text has no `~`, a derived token differs in its hash."""
    if len(text) <= limit and _MARK not in text and all(c in TOKEN_CHARACTERS for c in text):
        return text
    room = limit - len(_MARK) - _HASH_HEX
    folded = unicodedata.normalize("NFKD", text[: room * 4]).encode("ascii", "ignore").decode()
    readable = "".join(c if c in TOKEN_CHARACTERS and c != _MARK else "_" for c in folded)
    return f"{readable[:room]}{_MARK}{_sha256(text)[:_HASH_HEX]}"


def printable(text: str, limit: int = 200) -> str:
    """`text` for a log line: cut to `limit` characters (then `…`), control and other
    unprintable characters escaped (`\\r`, `\\n`, `\\x00`, a lone surrogate)."""
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return cut + "…" if len(text) > limit else cut


def _sha256(text: str) -> str:
    # surrogatepass: a JSON string may hold a lone surrogate, which UTF-8 cannot encode.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


async def _excerpt(response: aiohttp.ClientResponse) -> str:
    """The start of a refusal's body, for the dead letter's reason (Slack says
    `invalid_payload`, a validating receiver which field)."""
    try:
        head = await response.content.read(200)
    except Exception:
        return ""
    return printable(head.decode("utf-8", "replace").strip(), 200)
