"""Log setup: one JSON object per line (default) or plain text."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else was passed in `extra=` and is logged as a field.
# `asctime` is set on the record by Formatter.format: it is part of the line, not a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        fields = {k: v for k, v in fields.items() if not k.startswith("_")}
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def configure_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # botocore logs request details (never credentials at INFO) at DEBUG; keep it quiet.
    for noisy in ("botocore", "aiobotocore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class RetryLog:
    """One WARNING line for a failed call that will be retried: the AWS error code and message,
    no traceback (the error is expected and handled), at most one line per `what` every
    `interval` seconds, saying how many were not logged. Errors that are not AWS or network
    errors keep their traceback: they are bugs."""

    def __init__(self, logger: logging.Logger, interval: float = 30.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def failed(self, what: str, exc: BaseException, **fields: Any) -> None:
        from wildrydes_stream.aws.retry import describe_error, fault_of

        now = time.monotonic()
        if now - self._last.get(what, -math.inf) < self._interval:
            self._quiet[what] = self._quiet.get(what, 0) + 1
            return
        self._last[what] = now
        skipped = self._quiet.pop(what, 0)
        extra = {**fields, "error": describe_error(exc)}
        if skipped:
            extra["not_logged_since_last"] = skipped
        if fault_of(exc) == "other":
            self._logger.warning("%s failed, retrying", what, extra=extra, exc_info=exc)
        else:
            self._logger.warning("%s failed, retrying", what, extra=extra)
