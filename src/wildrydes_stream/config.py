"""Settings: defaults, then a TOML file, then `WILDRYDES_<SETTING>` environment variables.

Every setting is one field of `Settings`, with its help text and bounds beside it, so the
settings table of docs/operating.md and the validation come from the same place.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
import tomllib
import typing
import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from wildrydes_stream.errors import ConfigError

ENV_PREFIX = "WILDRYDES_"
CONFIG_FILE_ENV = "WILDRYDES_CONFIG"

StartingPosition = Literal["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP"]
StatusTimeFormat = Literal["epoch_ms", "string"]
LogFormat = Literal["json", "text"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
EventLoop = Literal["uvloop", "asyncio"]
ReadMode = Literal["polling", "fanout"]


def _setting(
    default: Any,
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    aliases: tuple[str, ...] = (),
    secret_path: bool = False,
) -> Any:
    """A setting; `secret_path` marks a URL whose path may carry a secret (shown as scheme and
    host only: `shown_value`), also left out of the settings' repr."""
    meta = {
        "doc": doc,
        "minimum": minimum,
        "maximum": maximum,
        "aliases": aliases,
        "secret_path": secret_path,
    }
    return dataclasses.field(default=default, metadata=meta, repr=not secret_path)


def _default_worker_id() -> str:
    # On Kubernetes the hostname is the pod name: unique per replica and readable in the table.
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    stream_name: str = _setting(
        "wildrydes-aggregated",
        "Kinesis stream of per-minute aggregates: `run` reads it, `aggregate` puts on it.",
    )
    raw_stream_name: str = _setting(
        "wildrydes",
        "Kinesis stream of raw per-second readings that `aggregate` reads.",
    )
    aggregate_lease_table_name: str = _setting(
        "wildrydes-aggregate-leases",
        "Lease table of `aggregate` (its own, so it runs beside `run` with the same settings); "
        "created if missing.",
    )
    window_seconds: int = _setting(
        60,
        "Length of `aggregate`'s tumbling event-time windows (one record per unicorn per "
        "window, labelled by its start).",
        minimum=1,
        maximum=3600,
    )
    allowed_lateness_seconds: float = _setting(
        60.0,
        "How far behind the latest StatusTime read on a shard a reading may come and still be "
        "in its window's first put: a window is put once the shard's watermark (latest "
        "StatusTime minus this) passes its end.",
        minimum=0.0,
        maximum=86400.0,
    )
    idle_window_timeout_seconds: float = _setting(
        120.0,
        "Wall time a unicorn may be silent on a shard before its windows still open are put "
        "anyway (the last minute of a ride).",
        minimum=0.1,
        maximum=86400.0,
    )
    late_horizon_seconds: float = _setting(
        3600.0,
        "A reading more than this behind the watermark is dead-lettered as `late`; later "
        "readings re-put their window with them included. Windows older than this are "
        "forgotten.",
        minimum=0.0,
        maximum=604800.0,
    )
    table_name: str = _setting(
        "UnicornSensorData",
        "DynamoDB table the items are written to (`TABLE_NAME` is honoured too).",
        aliases=("TABLE_NAME",),
    )
    lease_table_name: str = _setting(
        "wildrydes-stream-leases",
        "DynamoDB table holding shard leases and checkpoints (KCL layout); created if missing.",
    )
    worker_id: str = _setting(
        "", "Lease owner name of this process; empty means `<hostname>-<pid>`."
    )
    status_time_format: StatusTimeFormat = _setting(
        "epoch_ms",
        "How `StatusTime` is stored: `epoch_ms` (number, UTC milliseconds) or `string` (as read).",
    )
    starting_position: StartingPosition = _setting(
        "TRIM_HORIZON",
        "Where a shard without a checkpoint starts: TRIM_HORIZON, LATEST or AT_TIMESTAMP.",
    )
    starting_timestamp: str = _setting(
        "", "ISO 8601 time to start from with AT_TIMESTAMP (UTC when no zone is given)."
    )
    get_records_limit: int = _setting(
        10000, "Most records one GetRecords call returns.", minimum=1, maximum=10000
    )
    min_poll_interval_seconds: float = _setting(
        0.2,
        "Least time between two GetRecords calls on one shard (Kinesis allows 5 a second).",
        minimum=0.0,
        maximum=60.0,
    )
    idle_poll_interval_seconds: float = _setting(
        1.0,
        "Wait between polls of a shard that is caught up.",
        minimum=0.0,
        maximum=300.0,
    )
    read_mode: ReadMode = _setting(
        "polling",
        "How shards are read: `polling` (GetRecords, sharing each shard's 2 MB/s with every "
        "other polling reader) or `fanout` (enhanced fan-out: SubscribeToShard pushes records "
        "over HTTP/2 to a registered stream consumer with its own 2 MB/s a shard; costs extra, "
        "see docs/how-it-works.md).",
    )
    fanout_consumer_name: str = _setting(
        "wildrydes-stream",
        "Stream consumer `run` reads through in `fanout` mode; registered if missing, never "
        "deregistered by the service.",
    )
    aggregate_fanout_consumer_name: str = _setting(
        "wildrydes-aggregate",
        "Stream consumer `aggregate` reads the raw stream through in `fanout` mode.",
    )
    fanout_endpoint_url: str = _setting(
        "",
        "Endpoint of SubscribeToShard (HTTP/2); empty means the Kinesis endpoint botocore "
        "resolves. For local servers and tests.",
    )
    fanout_quiet_read_grid_seconds: float = _setting(
        0.1,
        "In `fanout` mode, a connection whose subscriptions brought no records for a second "
        "reads only on a grid of this many seconds, so idle shards' empty events share "
        "wake-ups; the first records after a quiet spell wait up to this long. 0: never held.",
        minimum=0.0,
        maximum=1.0,
    )
    lease_poll_interval_seconds: float = _setting(
        1.0,
        "How often the lease table is read: released, expired and handed-over leases are "
        "taken this soon (one Scan of the lease table each time).",
        minimum=0.05,
        maximum=300.0,
    )
    shard_sync_interval_seconds: float = _setting(
        10.0, "How often ListShards looks for new shards.", minimum=0.1, maximum=3600.0
    )
    queue_size: int = _setting(
        10000,
        "Records buffered between pollers and writers, in all; pollers wait when it is full.",
        minimum=1,
        maximum=1_000_000,
    )
    writers: int = _setting(
        8,
        "Concurrent DynamoDB writers (each owns a share of the item keys).",
        minimum=1,
        maximum=256,
    )
    batch_size: int = _setting(25, "Items per BatchWriteItem call.", minimum=1, maximum=25)
    batch_window_seconds: float = _setting(
        0.05,
        "Longest a writer waits to fill a batch before sending what it has.",
        minimum=0.0,
        maximum=10.0,
    )
    max_retry_attempts: int = _setting(
        -1,
        "Retries of a failed write (any fault that is not the record's own) before its records "
        "are dead-lettered; -1 retries for as long as the fault lasts (Lambda's "
        "MaximumRetryAttempts).",
        minimum=-1,
        maximum=10000,
    )
    max_record_age_seconds: float = _setting(
        -1.0,
        "A record whose write keeps failing is dead-lettered once it is older than this (from "
        "its arrival in Kinesis); -1 never (Lambda's MaximumRecordAgeInSeconds).",
        minimum=-1.0,
        maximum=604800.0,
    )
    max_write_units_per_second: float = _setting(
        0.0,
        "Write capacity units a second the writers may use in all (for a provisioned table); "
        "0 means no budget: throttling alone adapts the rate.",
        minimum=0.0,
        maximum=1_000_000.0,
    )
    max_buffered_bytes: int = _setting(
        64 * 1024 * 1024,
        "Bytes of record data held in memory in all (GetRecords pages and the writer queues); "
        "pollers fetch no more while it is reached.",
        minimum=1024,
        maximum=64 * 1024**3,
    )
    backoff_base_seconds: float = _setting(
        0.05,
        "First retry delay; doubles each attempt, with full jitter.",
        minimum=0.0,
        maximum=60.0,
    )
    backoff_max_seconds: float = _setting(
        5.0, "Cap on one retry delay.", minimum=0.0, maximum=300.0
    )
    lease_duration_seconds: float = _setting(
        10.0,
        "A lease whose counter has not moved for this long is expired and may be taken over "
        "by another worker; owners renew every third of it.",
        minimum=0.1,
        maximum=3600.0,
    )
    handoff_timeout_seconds: float = _setting(
        30.0,
        "A lease handed over (KCL 3's checkpointOwner) is read by its new owner once the old "
        "one has checkpointed, or after this long if it never does.",
        minimum=0.1,
        maximum=3600.0,
    )
    checkpoint_interval_seconds: float = _setting(
        5.0, "How often finished progress is checkpointed.", minimum=0.05, maximum=3600.0
    )
    shutdown_grace_seconds: float = _setting(
        30.0,
        "On SIGTERM, how long to drain in-flight records before giving up.",
        minimum=0.0,
        maximum=3600.0,
    )
    http_host: str = _setting("0.0.0.0", "Address of the /metrics, /healthz and /readyz server.")
    http_port: int = _setting(
        8080,
        "Port of the /metrics, /healthz and /readyz server (0 picks a free one).",
        minimum=0,
        maximum=65535,
    )
    deadletter_file: str = _setting(
        "deadletter.jsonl",
        "JSON-lines file for dead letters; empty disables it (then set deadletter_queue_url).",
    )
    deadletter_queue_url: str = _setting("", "SQS queue URL for dead letters; empty disables it.")
    deadletter_s3_uri: str = _setting(
        "",
        "`s3://bucket/prefix` for dead letters, one object per batch, any record size; empty "
        "disables it.",
    )
    alert_magic_threshold: int = _setting(
        50,
        "A unicorn whose `MinMagicPoints` falls below this raises one `firing` alert; one "
        "`resolved` alert follows when it is back at or above it.",
        minimum=0,
        maximum=1_000_000,
    )
    alert_sns_topic_arn: str = _setting(
        "", "SNS topic ARN low-magic alerts are published to; empty disables it."
    )
    alert_webhook_url: str = _setting(
        "",
        "http(s) URL each low-magic alert is POSTed to as one JSON object (2xx = delivered); "
        "empty disables it.",
        secret_path=True,
    )
    alert_max_unicorns_tracked: int = _setting(
        1000,
        "Unicorns with a `wildrydes_unicorn_min_magic_points` series; past it, no new series "
        "(alerts still fire).",
        minimum=0,
        maximum=1_000_000,
    )
    alert_queue_size: int = _setting(
        1000,
        "Alerts waiting for delivery; pollers wait when it is full.",
        minimum=1,
        maximum=1_000_000,
    )
    alert_delivery_timeout_seconds: float = _setting(
        10.0,
        "Longest one delivery attempt of an alert to SNS or the webhook takes before it counts "
        "as failed and is retried.",
        minimum=0.1,
        maximum=600.0,
    )
    blocked_log_interval_seconds: float = _setting(
        30.0,
        "While writes fail for a reason retrying alone will not fix (permissions, credentials, "
        "a missing table), how often the cause is logged again.",
        minimum=0.1,
        maximum=3600.0,
    )
    log_format: LogFormat = _setting("json", "Log lines: `json` (one object a line) or `text`.")
    log_level: LogLevel = _setting("INFO", "Least level logged: DEBUG, INFO, WARNING, ERROR.")
    event_loop: EventLoop = _setting(
        "uvloop",
        "Event loop of `run` and `aggregate`: `uvloop` (a little less CPU for many idle "
        "shards) or `asyncio` (about a tenth less CPU a record when catching up); see "
        "docs/performance.md.",
    )

    @property
    def owner(self) -> str:
        return self.worker_id or _default_worker_id()

    @property
    def state_table_name(self) -> str:
        """Where the applications' per-shard state lives (windows, alert states): beside the
        lease table, named after it; created if missing."""
        return f"{self.lease_table_name}-state"

    def starting_datetime(self) -> datetime | None:
        if not self.starting_timestamp:
            return None
        return _parse_timestamp(self.starting_timestamp, "starting_timestamp")

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed, validated like a loaded one."""
        return _validate(dataclasses.replace(self, **changes))


def describe() -> list[tuple[str, str, Any, str]]:
    """(setting, environment variable, default, help) for every setting, for docs and --help."""
    rows = []
    for field in dataclasses.fields(Settings):
        env = ENV_PREFIX + field.name.upper()
        names = " / ".join([env, *field.metadata["aliases"]])
        rows.append((field.name, names, field.default, field.metadata["doc"]))
    return rows


def application_of(settings: Settings) -> Literal["run", "aggregate"]:
    """`aggregate` for the aggregator's consumer settings (aggregate/app.py consumer_settings
    reads `raw_stream_name` under `aggregate_lease_table_name`), else `run`: messages from the
    shared consumer core name that application's settings and commands."""
    if (settings.stream_name, settings.lease_table_name) == (
        settings.raw_stream_name,
        settings.aggregate_lease_table_name,
    ):
        return "aggregate"
    return "run"


def stream_setting(settings: Settings) -> str:
    """The setting, with its variable, that names the stream a consumer reads."""
    name = "raw_stream_name" if application_of(settings) == "aggregate" else "stream_name"
    return f"{name} ({ENV_PREFIX}{name.upper()})"


def redact_url(url: str) -> str:
    """The URL as logs and messages may show it: scheme and host (with port) only, `…` for
    anything after them. Webhook URLs (Slack, Teams) carry their secret in the path or query,
    and user info may hold a password, so neither is shown."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "…"
    if parts.scheme and parts.netloc:
        host = parts.netloc.rpartition("@")[2]
        rest = "" if parts.path in ("", "/") and not parts.query and not parts.fragment else "…"
        return f"{parts.scheme}://{host}/{rest}"
    # Not scheme://host: show what looks like a host before the first "/", nothing else.
    head, slash, _ = url.partition("/")
    if "." in head and head.isascii() and head.isprintable() and "@" not in head:
        return f"{head}/…" if slash else head
    return "…"


def shown_value(name: str, value: Any) -> tuple[Any, bool]:
    """(the value as it may be shown, whether it was redacted) for a setting."""
    field = next(f for f in dataclasses.fields(Settings) if f.name == name)
    if field.metadata["secret_path"] and isinstance(value, str) and value:
        shown = redact_url(value)
        return shown, shown != value
    return value, False


# WILDRYDES_* variables that are not settings.
OTHER_VARIABLES = frozenset(
    {
        CONFIG_FILE_ENV,
        "WILDRYDES_STRICT",
        "WILDRYDES_NODE_MODULES",
        "WILDRYDES_SHARED_DATA",
        "WILDRYDES_REVISION",
    }
)


@dataclasses.dataclass(frozen=True)
class Loaded:
    """Settings in effect, where each came from, and what looked wrong but was not fatal."""

    settings: Settings
    sources: dict[str, str]
    """Setting name -> `default`, `<file>` or `environment variable <NAME>`."""
    warnings: list[str]
    """One line each: unknown WILDRYDES_* variables, settings without effect."""


def load_settings(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Defaults, overridden by the TOML file, overridden by the environment; then validated."""
    return load(path, environ).settings


def load(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    strict: bool = False,
) -> Loaded:
    """`load_settings`, telling where each value came from. Unknown WILDRYDES_* variables and
    settings that have no effect are warnings, or a ConfigError under `strict`."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_FILE_ENV) or None
    raw: dict[str, tuple[Any, str]] = {}
    if path is not None:
        for key, value in _read_file(Path(path)).items():
            raw[key] = (value, f"{path}: {key}")
    fields = {field.name: field for field in dataclasses.fields(Settings)}
    for name, field in fields.items():
        for env in (*reversed(field.metadata["aliases"]), ENV_PREFIX + name.upper()):
            if env in environ:
                raw[name] = (environ[env], f"environment variable {env}")
    values = {name: _coerce(fields[name], value, where) for name, (value, where) in raw.items()}
    settings = _validate(Settings(**values))
    sources = {name: raw[name][1] if name in raw else "default" for name in fields}
    warnings = _unknown_variables(environ, strict) + _without_effect(settings, sources)
    if strict and warnings:
        raise ConfigError(f"{warnings[0]} (refused under --strict / WILDRYDES_STRICT)")
    return Loaded(settings, sources, warnings)


def _unknown_variables(environ: Mapping[str, str], strict: bool = False) -> list[str]:
    # Under strict the variable is refused, not ignored: the line must not say otherwise.
    outcome = "" if strict else " and is ignored"
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    lines = []
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable in known | OTHER_VARIABLES:
            continue
        guess = difflib.get_close_matches(variable, sorted(known), n=1, cutoff=0.75)
        hint = f"; did you mean {guess[0]}?" if guess else ": unset it or correct its name"
        lines.append(f"environment variable {variable} is not a setting{outcome}{hint}")
    return lines


def _without_effect(settings: Settings, sources: Mapping[str, str]) -> list[str]:
    lines = []
    if settings.starting_timestamp and settings.starting_position != "AT_TIMESTAMP":
        lines.append(
            f"starting_timestamp ({sources['starting_timestamp']}) has no effect with "
            f"starting_position {settings.starting_position}: set it to AT_TIMESTAMP or drop it"
        )
    return lines


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a TOML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"config file {path} cannot be read: {reason}") from None
    known = sorted(field.name for field in dataclasses.fields(Settings))
    for key in data:
        if key not in known:
            guess = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            raise ConfigError(f"{path}: unknown setting {key!r}{hint}")
    return data


def _coerce(field: dataclasses.Field[Any], value: Any, where: str) -> Any:
    kind = typing.get_type_hints(Settings)[field.name]
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        text = str(value)
        if field.name in ("starting_position", "log_level"):
            text = text.upper()
        if text not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
        return text
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    try:
        if kind is int and not isinstance(value, bool | float):
            number: float = int(value)
        elif kind is float and not isinstance(value, bool):
            number = float(value)
        else:
            raise ValueError
    except ValueError:
        expected = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{where}: expected {expected}, got {value!r}") from None
    low, high = field.metadata["minimum"], field.metadata["maximum"]
    if (low is not None and number < low) or (high is not None and number > high):
        raise ConfigError(f"{where}: {value!r} is outside {low}..{high}")
    return number


def _validate(settings: Settings) -> Settings:
    for name in (
        "stream_name",
        "table_name",
        "lease_table_name",
        "raw_stream_name",
        "aggregate_lease_table_name",
        "fanout_consumer_name",
        "aggregate_fanout_consumer_name",
    ):
        if not getattr(settings, name):
            raise ConfigError(f"setting {name} must not be empty")
    if settings.starting_position == "AT_TIMESTAMP" and not settings.starting_timestamp:
        raise ConfigError(
            "setting starting_timestamp is required when starting_position is AT_TIMESTAMP"
        )
    settings.starting_datetime()
    if not (
        settings.deadletter_file or settings.deadletter_queue_url or settings.deadletter_s3_uri
    ):
        raise ConfigError(
            "settings deadletter_file, deadletter_queue_url and deadletter_s3_uri are all empty: "
            "dead letters need somewhere to go"
        )
    if settings.deadletter_s3_uri and not settings.deadletter_s3_uri.startswith("s3://"):
        raise ConfigError(
            f"setting deadletter_s3_uri: {settings.deadletter_s3_uri!r} is not s3://bucket/prefix"
        )
    _check_alert_destinations(settings)
    if -1 < settings.max_record_age_seconds < 0:
        raise ConfigError("setting max_record_age_seconds must be -1 (never) or at least 0")
    if settings.backoff_max_seconds < settings.backoff_base_seconds:
        raise ConfigError("setting backoff_max_seconds is below backoff_base_seconds")
    return settings


def check_deadletter_file(settings: Settings) -> None:
    """For the commands that write dead letters: the file must be writable, or creatable in
    a writable directory (a read-only root filesystem is a bad setting, not a crash)."""
    if not settings.deadletter_file:
        return
    path = os.path.abspath(settings.deadletter_file)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        reason = "it is a directory"
    elif os.path.exists(path):
        reason = "" if os.access(path, os.W_OK) else "the file is not writable"
    elif not os.path.isdir(parent):
        reason = f"the directory {parent} does not exist"
    elif not os.access(parent, os.W_OK | os.X_OK):
        reason = f"the directory {parent} is not writable (a read-only filesystem?)"
    else:
        reason = ""
    if reason:
        raise ConfigError(
            f"setting deadletter_file: cannot write {settings.deadletter_file}: {reason}; "
            "set WILDRYDES_DEADLETTER_FILE to a writable path (on Kubernetes, on a volume)"
        )


# arn:PARTITION:sns:REGION:ACCOUNT:NAME (a FIFO topic's name ends in .fifo).
_TOPIC_ARN = re.compile(r"arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?")


def _check_alert_destinations(settings: Settings) -> None:
    arn = settings.alert_sns_topic_arn
    if arn and not _TOPIC_ARN.fullmatch(arn):
        raise ConfigError(
            f"setting alert_sns_topic_arn: {arn!r} is not an SNS topic ARN "
            "(arn:aws:sns:REGION:ACCOUNT:TOPIC)"
        )
    url = settings.alert_webhook_url
    if url:
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"setting alert_webhook_url: {redact_url(url)!r} is not an http:// or https:// "
                "URL with a host"
            )


def _parse_timestamp(text: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"setting {name}: {text!r} is not an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
