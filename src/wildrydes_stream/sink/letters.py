"""The dead-letter entry: how a record that could not be written is stored, and read back.

One JSON object per record, the same in every destination:

    {"reason": ..., "kind": ..., "application": "run" | "aggregate", "stream": ...,
     "shard_id": ..., "sequence_number": "...", "arrival_time": ISO 8601,
     "dead_lettered_at": ISO 8601, "data_base64": ...}

`application` is the service that dead-lettered the record, and so where `redrive` sends it
back: `run`'s records into the table, `aggregate`'s onto the stream in `stream`. Entries
written before entries named their application carry none; `application_of` reads them.

The raw record is stored once, as base64 (any bytes survive JSON). Where a destination cannot
hold it (an SQS message is at most 256 KiB) the entry carries `data_s3_uri` and `data_s3_line`
instead, pointing at the line of the S3 object that holds the whole entry, or no payload at all
when no S3 destination is configured (the reason then says so). Entries written before the
payload was stored once also carry the text as `data`; readers still accept it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from wildrydes_stream.errors import ConfigError
from wildrydes_stream.records.envelope import DeadLetter
from wildrydes_stream.records.position import sequence_of, sub_of

OMITTED_NOTE = " (record data too large for SQS, omitted)"

RUN: Final = "run"
AGGREGATE: Final = "aggregate"


def entry(letter: DeadLetter, at: datetime, application: str) -> dict[str, Any]:
    """The entry of one dead letter of `application` (`run` or `aggregate`), with its payload."""
    return {
        "reason": letter.reason,
        "kind": letter.kind,
        "application": application,
        "stream": letter.stream,
        "shard_id": letter.shard_id,
        "sequence_number": str(sequence_of(letter.sequence)),
        # The user record's index in a KPL aggregate (0 for a plain record), as KCL numbers it.
        "subsequence_number": sub_of(letter.sequence),
        "arrival_time": datetime.fromtimestamp(letter.arrival, UTC).isoformat(),
        "dead_lettered_at": at.isoformat(),
        "data_base64": base64.b64encode(letter.data).decode("ascii"),
    }


def dumps(value: dict[str, Any]) -> str:
    # ASCII only: SQS refuses some Unicode characters in a message body, and JSON escapes them.
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Pointer:
    """Where the whole entry of a record lives when a message could not hold its payload."""

    uri: str  # s3://bucket/key
    line: int  # 1-based line of the object


def payload(value: dict[str, Any]) -> bytes | Pointer | None:
    """The raw record an entry holds, where to fetch it, or None when it was not kept."""
    if isinstance(value.get("data_base64"), str):
        try:
            return base64.b64decode(value["data_base64"], validate=True)
        except (binascii.Error, ValueError):
            return None
    if isinstance(value.get("data"), str):  # entries written before the payload was stored once
        return bytes(value["data"].encode("utf-8"))
    uri, line = value.get("data_s3_uri"), value.get("data_s3_line")
    if isinstance(uri, str) and isinstance(line, int):
        return Pointer(uri, line)
    return None


def application_of(value: dict[str, Any], raw_stream: str) -> str:
    """The application that dead-lettered an entry, as the entry names it.

    Entries written before entries named their application carry none. Such an entry is
    `aggregate`'s when its stream is `raw_stream` (a reading: no other application reads that
    stream) and `run`'s otherwise (a record of the stream `run` copies into the table; a
    window `aggregate` could not put on that stream ends in the table either way)."""
    application = value.get("application")
    if isinstance(application, str):
        return application
    return AGGREGATE if value.get("stream") == raw_stream else RUN


def identity(value: dict[str, Any]) -> tuple[str, str] | None:
    """(shard id, sequence number) of an entry, with `:index` for a user record of a KPL
    aggregate past its first: what a pointer's target is checked against."""
    shard, sequence = value.get("shard_id"), value.get("sequence_number")
    sub = value.get("subsequence_number", 0)
    if isinstance(shard, str) and isinstance(sequence, str):
        return shard, f"{sequence}:{sub}" if isinstance(sub, int) and sub > 0 else sequence
    return None


def parse_line(line: str) -> dict[str, Any] | None:
    """One JSON line as an entry, or None when it is not one (a torn or foreign line)."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True, slots=True)
class S3Uri:
    bucket: str
    prefix: str  # without leading or trailing "/"; "" for the whole bucket

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def parse_s3_uri(text: str, what: str) -> S3Uri:
    """`s3://bucket/prefix` -> S3Uri; a malformed one names `what` (the setting or option)."""
    if not text.startswith("s3://"):
        raise ConfigError(f"{what}: {text!r} is not s3://bucket/prefix")
    bucket, _, prefix = text[len("s3://") :].partition("/")
    if not bucket:
        raise ConfigError(f"{what}: {text!r} names no bucket (s3://bucket/prefix)")
    return S3Uri(bucket, prefix.strip("/"))
