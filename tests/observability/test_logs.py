"""Log lines: one line per event, no duplicated fields, no traceback for a handled AWS error."""

from __future__ import annotations

import logging

import pytest
from botocore.exceptions import ClientError

from wildrydes_stream.observability.logs import JsonFormatter, RetryLog, TextFormatter


def record(message: str, **fields: object) -> logging.LogRecord:
    entry = logging.LogRecord("wildrydes_stream.test", logging.INFO, __file__, 1, message, (), None)
    entry.__dict__.update(fields)
    return entry


def test_a_text_line_carries_the_time_once_and_the_fields_after_it() -> None:
    line = TextFormatter().format(record("reading shard", shard="shardId-000000000000"))
    assert "asctime" not in line
    assert line.endswith("INFO wildrydes_stream.test: reading shard shard=shardId-000000000000")


def test_a_json_line_has_no_asctime_field() -> None:
    formatter = TextFormatter()
    entry = record("hello", shard="s")
    formatter.format(entry)  # sets entry.asctime, as a first handler would
    assert "asctime" not in JsonFormatter().format(entry)


def throttled() -> ClientError:
    return ClientError(
        {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "UpdateItem"
    )


def test_a_retried_aws_error_is_one_warning_line_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    retry_log = RetryLog(logging.getLogger("wildrydes_stream.test"), interval=3600)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            retry_log.failed("checkpoint", throttled())
    [entry] = caplog.records
    assert entry.levelno == logging.WARNING
    assert entry.exc_info is None
    assert entry.getMessage() == "checkpoint failed, retrying"
    assert entry.__dict__["error"].startswith("ThrottlingException: ")


def test_an_unexpected_error_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    retry_log = RetryLog(logging.getLogger("wildrydes_stream.test"))
    with caplog.at_level(logging.WARNING):
        try:
            raise KeyError("checkpoint")
        except KeyError as exc:
            retry_log.failed("checkpoint", exc)
    [entry] = caplog.records
    assert entry.exc_info is not None
