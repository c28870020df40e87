"""Dead-letter destinations: a local JSON-lines file and an SQS queue.

An entry carries the raw record (base64, plus the text when it is UTF-8), the reason, stream,
shard, sequence number and arrival time. `send` returns only once every configured destination
has the entries durably, so the caller may then count the records as finished.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from wildrydes_stream.errors import WildrydesError
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records import DeadLetter

log = logging.getLogger(__name__)

SQS_BATCH = 10
SQS_MAX_BODY = 256 * 1024


def entry_json(letter: DeadLetter) -> str:
    """One dead-letter entry as compact JSON: the raw record and where it came from."""
    entry: dict[str, Any] = {
        "reason": letter.reason,
        "kind": letter.kind,
        "stream": letter.stream,
        "shard_id": letter.shard_id,
        "sequence_number": str(letter.sequence),
        "arrival_time": datetime.fromtimestamp(letter.arrival, UTC).isoformat(),
        "dead_lettered_at": datetime.now(UTC).isoformat(),
        "data_base64": base64.b64encode(letter.data).decode("ascii"),
    }
    with contextlib.suppress(UnicodeDecodeError):
        entry["data"] = letter.data.decode("utf-8")
    return json.dumps(entry, separators=(",", ":"))


class Destination(Protocol):
    async def send(self, letters: list[DeadLetter]) -> None: ...


class FileDestination:
    """Appends JSON lines and fsyncs before returning."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = asyncio.Lock()
        try:
            # Found out at start, not when the first bad record arrives.
            with self.path.open("a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise WildrydesError(
                f"cannot write the dead-letter file {self.path}: {exc.strerror}; set "
                "deadletter_file (WILDRYDES_DEADLETTER_FILE) to a writable path"
            ) from None

    async def send(self, letters: list[DeadLetter]) -> None:
        text = "".join(entry_json(letter) + "\n" for letter in letters)
        async with self._lock:
            await asyncio.to_thread(self._append, text)

    def _append(self, text: str) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


class SqsDestination:
    """SendMessageBatch, retrying failed entries until SQS has them all."""

    def __init__(self, client: Any, queue_url: str, max_attempts: int = 20) -> None:
        self._client = client
        self._queue_url = queue_url
        self._max_attempts = max_attempts

    async def send(self, letters: list[DeadLetter]) -> None:
        for batch in _batches([_sqs_body(letter) for letter in letters]):
            await self._send_batch(batch)

    async def _send_batch(self, bodies: list[str]) -> None:
        entries = {str(i): body for i, body in enumerate(bodies)}
        for attempt in range(self._max_attempts):
            response = await self._client.send_message_batch(
                QueueUrl=self._queue_url,
                Entries=[{"Id": i, "MessageBody": body} for i, body in entries.items()],
            )
            failed = {f["Id"] for f in response.get("Failed", [])}
            entries = {i: body for i, body in entries.items() if i in failed}
            if not entries:
                return
            await asyncio.sleep(min(5.0, 0.1 * 2**attempt))
        raise RuntimeError(f"SQS refused {len(entries)} dead letters after retries")


def _batches(bodies: list[str]) -> list[list[str]]:
    """SendMessageBatch takes 10 messages and SQS_MAX_BODY bytes in all, whichever comes first."""
    batches: list[list[str]] = []
    size = 0
    for body in bodies:
        length = len(body.encode())
        if not batches or len(batches[-1]) == SQS_BATCH or size + length > SQS_MAX_BODY:
            batches.append([])
            size = 0
        batches[-1].append(body)
        size += length
    return batches


def _sqs_body(letter: DeadLetter) -> str:
    body = entry_json(letter)
    if len(body.encode()) <= SQS_MAX_BODY:
        return body
    # A record near Kinesis's 1 MiB limit does not fit in one SQS message: keep its metadata
    # and say so, rather than losing the entry.
    clipped = DeadLetter(
        b"",
        letter.reason + " (record data too large for SQS, omitted)",
        letter.kind,
        letter.stream,
        letter.shard_id,
        letter.sequence,
        letter.arrival,
    )
    return entry_json(clipped)


class DeadLetters:
    """Every configured destination; counts what it sends."""

    def __init__(self, destinations: list[Destination], metrics: Metrics) -> None:
        if not destinations:
            raise ValueError("at least one dead-letter destination is needed")
        self._destinations = destinations
        self._metrics = metrics

    async def send(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        await asyncio.gather(*(d.send(letters) for d in self._destinations))
        for letter in letters:
            self._metrics.records_dead_lettered.labels(letter.kind).inc()
            log.warning(
                "record dead-lettered",
                extra={
                    "shard": letter.shard_id,
                    "sequence_number": str(letter.sequence),
                    "reason": letter.reason,
                },
            )
