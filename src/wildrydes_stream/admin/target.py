"""Where `reset --to` moves a checkpoint, and whether a shard can be read from there.

A position the worker cannot start at would be written without complaint and then fail
GetShardIterator on every attempt, so it is refused before anything is moved: a sequence
number must lie in the shard's range (ListShards) and be one Kinesis accepts for that shard
(sequence numbers encode their shard: a number from another shard can lie in the range), and
a time must not be in the future (checked when parsed, before any AWS call).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from wildrydes_stream.aws.retry import error_code
from wildrydes_stream.config import _parse_timestamp
from wildrydes_stream.errors import ConfigError

KEYWORDS = ("TRIM_HORIZON", "LATEST")
AT_TIMESTAMP = "AT_TIMESTAMP"


@dataclass(frozen=True)
class Target:
    """Where to move a checkpoint: a sentinel, a sequence number (reading resumes after it,
    as a checkpoint means), or a moment (AT_TIMESTAMP with its time recorded)."""

    checkpoint: str
    moment_ms: int | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        word = text.strip().upper()
        if word in KEYWORDS:
            return cls(word)
        if text.isdigit():
            return cls(text)
        try:
            moment: datetime = _parse_timestamp(text, "--to")
        except ConfigError:
            raise ConfigError(
                f"--to {text!r} is not TRIM_HORIZON, LATEST, a sequence number or an ISO 8601 "
                "time (e.g. 2026-11-28T18:00:00, UTC unless a zone is given)"
            ) from None
        if moment > datetime.now(UTC):
            raise ConfigError(
                f"--to {text}: the time is in the future, there is nothing to read from there; "
                "give a past time, or LATEST for only what comes next"
            )
        return cls(AT_TIMESTAMP, round(moment.timestamp() * 1000))

    def __str__(self) -> str:
        """As `reset` prints it: the time of an AT_TIMESTAMP too."""
        if self.moment_ms is None:
            return self.checkpoint
        moment = datetime.fromtimestamp(self.moment_ms / 1000, UTC)
        return f"{AT_TIMESTAMP} {moment.isoformat(timespec='milliseconds')}"


async def check(kinesis: Any, stream: str, shard_id: str, target: Target) -> None:
    """ConfigError, naming the shard and what to do, when reading cannot start at `target`
    (a time was checked when parsed)."""
    if not target.checkpoint.isdigit():
        return
    sequence = int(target.checkpoint)
    first, last = await _sequence_range(kinesis, stream, shard_id)
    if sequence < first or (last is not None and sequence > last):
        span = f"{first}..{last}" if last is not None else f"{first} and above"
        raise ConfigError(
            f"--to {target.checkpoint}: not a sequence number of {shard_id} of stream {stream} "
            f"(its range is {span}); take one from `status` or the records, or use "
            "TRIM_HORIZON, LATEST or a time"
        )
    try:
        await kinesis.get_shard_iterator(
            StreamName=stream,
            ShardId=shard_id,
            ShardIteratorType="AFTER_SEQUENCE_NUMBER",
            StartingSequenceNumber=target.checkpoint,
        )
    except ClientError as exc:
        if error_code(exc) != "InvalidArgumentException":
            raise
        reason = exc.response.get("Error", {}).get("Message", "")
        raise ConfigError(
            f"--to {target.checkpoint}: Kinesis refuses it for {shard_id} of stream {stream} "
            f"({reason}); take one from `status` or the records, or use TRIM_HORIZON, LATEST "
            "or a time"
        ) from None


async def _sequence_range(kinesis: Any, stream: str, shard_id: str) -> tuple[int, int | None]:
    """(first, last) sequence number of the shard; last is None while it is open."""
    kwargs: dict[str, Any] = {"StreamName": stream}
    while True:
        response = await kinesis.list_shards(**kwargs)
        for shard in response.get("Shards", []):
            if shard["ShardId"] == shard_id:
                span = shard["SequenceNumberRange"]
                last = span.get("EndingSequenceNumber")
                return int(span["StartingSequenceNumber"]), None if last is None else int(last)
        token = response.get("NextToken")
        if not token:
            raise ConfigError(
                f"--to a sequence number: {shard_id} is no longer in stream {stream} (its "
                "records expired): use TRIM_HORIZON"
            )
        kwargs = {"NextToken": token}
