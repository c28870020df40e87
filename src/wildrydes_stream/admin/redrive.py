"""`wildrydes-stream redrive --from FILE|SQS-URL|S3-URI`: dead letters back into the table.

Once the cause is fixed (a table that was missing, a permission, a bug in a producer), each
entry's record goes through the service's own decoding (`records.decode_item`) and writing path
(`WriterPool`). What is written leaves its source; what fails again, or still cannot be decoded,
stays there unchanged: the file is rewritten atomically with only those entries, SQS messages
are deleted once their record is written, S3 objects are deleted once every record in them is
written and rewritten with the others otherwise. Writes are idempotent puts, so running it
twice is harmless: the second run finds only what still failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from botocore.exceptions import BotoCoreError, ClientError

from wildrydes_stream.aws.clients import AwsClients
from wildrydes_stream.aws.retry import error_code
from wildrydes_stream.config import Settings
from wildrydes_stream.copy.item import decode_item
from wildrydes_stream.errors import RecordError, WildrydesError
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.envelope import DeadLetter, Envelope
from wildrydes_stream.sink.deadletter import DeadLetters, LetterBatch, locked
from wildrydes_stream.sink.deadletter_s3 import SUFFIX
from wildrydes_stream.sink.dynamodb import WriterPool
from wildrydes_stream.sink.letters import Pointer, identity, parse_line, parse_s3_uri, payload

log = logging.getLogger(__name__)

# Messages taken per round, and how long they stay hidden from other consumers meanwhile
# (covers one round's writes with their retries; failed ones are made visible again at once).
SQS_ROUND: Final = 100
SQS_VISIBILITY_SECONDS: Final = 300


@dataclass
class Report:
    source: str
    written: int = 0
    failed: int = 0

    def line(self) -> str:
        where = "nothing left" if not self.failed else "the failed ones stay there"
        return (
            f"redrive from {self.source}: {self.written} records written, "
            f"{self.failed} failed again ({where})"
        )


async def redrive(settings: Settings, source: str, max_retry_attempts: int) -> Report:
    # A finite cap by default so the command ends; record age means nothing here.
    settings = settings.replace(max_retry_attempts=max_retry_attempts, max_record_age_seconds=-1.0)
    async with AwsClients() as clients:
        payloads = Payloads(clients.s3)
        async with TableWriter(clients.dynamodb_data, settings) as writer:
            redriver = Redriver(settings, writer, payloads, Report(source))
            if source.startswith("s3://"):
                await redriver.bucket(clients.s3, source)
            elif source.startswith(("https://", "http://")):
                await redriver.queue(clients.sqs, source)
            else:
                await redriver.file(Path(source))
            return redriver.report


class _Ack:
    """The tenure of one redriven record: never fenced; notes that the writer finished it."""

    fenced = False

    def __init__(self) -> None:
        self.done = False

    def finish(self, sequence: int) -> None:
        self.done = True


class _Collect:
    """A dead-letter destination that only keeps what it is given: records failing again are
    reported to the command, not sent to the service's destinations."""

    name = "file"
    archive = False

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def check(self) -> None:
        pass

    async def send(self, batch: LetterBatch) -> None:
        self.letters.extend(batch.letters)


class TableWriter:
    """The service's WriterPool, kept to this one class (its internals change independently)."""

    def __init__(self, client: Any, settings: Settings) -> None:
        self._collect = _Collect()
        metrics = Metrics()
        self._failure: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._pool = WriterPool(
            client, settings, DeadLetters([self._collect], metrics), metrics, self._fail
        )

    def _fail(self, exc: BaseException) -> None:
        if not self._failure.done():
            self._failure.set_result(exc)

    async def __aenter__(self) -> TableWriter:
        self._pool.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._pool.stop()

    async def write(self, envelopes: list[Envelope]) -> list[DeadLetter]:
        """Write every envelope; returns the dead letters of those that failed again."""

        async def put_all() -> None:
            for envelope in envelopes:
                await self._pool.put(envelope)
            await self._pool.drain()

        work: asyncio.Future[Any] = asyncio.ensure_future(put_all())
        # A writer dying would leave drain() waiting forever: stop on it instead.
        failure: asyncio.Future[Any] = self._failure
        await asyncio.wait({work, failure}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            raise WildrydesError(f"writing to the table failed: {self._failure.result()!r}")
        work.result()
        letters, self._collect.letters = self._collect.letters, []
        return letters


class Payloads:
    """An entry's raw record, fetching the S3 object an SQS pointer names (once per object)."""

    def __init__(self, s3: Any) -> None:
        self._s3 = s3
        self._objects: dict[str, list[dict[str, Any] | None] | None] = {}

    async def of(self, value: dict[str, Any]) -> bytes | None:
        found = payload(value)
        if not isinstance(found, Pointer):
            return found
        lines = await self._object(found.uri)
        if lines is None:
            return None
        # The pointed-at line first; then the whole object, as a redrive from S3 that rewrote
        # it with only its failed entries has moved the lines.
        at = [lines[found.line - 1]] if 0 < found.line <= len(lines) else []
        for candidate in [*at, *lines]:
            if candidate is not None and identity(candidate) == identity(value):
                data = payload(candidate)
                return data if isinstance(data, bytes) else None
        return None

    async def _object(self, uri: str) -> list[dict[str, Any] | None] | None:
        if uri not in self._objects:
            bucket, _, key = uri.removeprefix("s3://").partition("/")
            try:
                response = await self._s3.get_object(Bucket=bucket, Key=key)
                body: bytes = await response["Body"].read()
            except ClientError as exc:
                if error_code(exc) not in ("NoSuchKey", "NoSuchBucket"):
                    raise
                log.warning("the S3 object holding a record is gone", extra={"uri": uri})
                self._objects[uri] = None
            else:
                self._objects[uri] = [parse_line(line) for line in body.decode().splitlines()]
        return self._objects[uri]


class Redriver:
    def __init__(
        self, settings: Settings, writer: TableWriter, payloads: Payloads, report: Report
    ) -> None:
        self._settings = settings
        self._writer = writer
        self._payloads = payloads
        self.report = report

    async def written(self, values: list[dict[str, Any] | None]) -> list[bool]:
        """For each entry, whether its record is now in the table; counts both outcomes."""
        envelopes: dict[int, Envelope] = {}
        for index, value in enumerate(values):
            if value is None:
                self._stays("not a dead-letter entry")
                continue
            data = await self._payloads.of(value)
            if data is None:
                self._stays("the entry holds no record data")
                continue
            try:
                key, item = decode_item(data, self._settings.status_time_format)
            except RecordError as exc:
                self._stays(str(exc))
                continue
            shard, sequence = _origin(value, index)
            envelopes[index] = Envelope(shard, sequence, key, item, time.time(), data, _Ack())
        failed = {(d.shard_id, d.sequence) for d in await self._writer.write([*envelopes.values()])}
        result = [False] * len(values)
        for index, envelope in envelopes.items():
            ack = envelope.tenure
            assert isinstance(ack, _Ack)
            result[index] = ack.done and (envelope.shard_id, envelope.sequence) not in failed
        self.report.written += sum(result)
        self.report.failed += len(values) - sum(result)
        return result

    def _stays(self, reason: str) -> None:
        log.warning("dead letter cannot be written, it stays", extra={"reason": reason})

    async def file(self, path: Path) -> None:
        snapshot = await asyncio.to_thread(_read, path)
        lines = [line for line in snapshot.decode("utf-8", "surrogateescape").splitlines() if line]
        written = await self.written([parse_line(line) for line in lines])
        kept = "".join(f"{line}\n" for line, done in zip(lines, written, strict=True) if not done)
        await asyncio.to_thread(_rewrite, path, snapshot, kept.encode("utf-8", "surrogateescape"))

    async def queue(self, sqs: Any, url: str) -> None:
        await _aws(f"--from {url}", sqs.get_queue_attributes(QueueUrl=url))
        seen: set[str] = set()
        failed: list[str] = []
        while True:
            messages = await self._receive(sqs, url, seen)
            if not messages:
                break
            written = await self.written([parse_line(m["Body"]) for m in messages])
            outcomes = list(zip(messages, written, strict=True))
            done = [m for m, ok in outcomes if ok]
            failed += [m["ReceiptHandle"] for m, ok in outcomes if not ok]
            for start in range(0, len(done), 10):
                entries = [
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                    for i, m in enumerate(done[start : start + 10])
                ]
                response = await sqs.delete_message_batch(QueueUrl=url, Entries=entries)
                if response.get("Failed"):  # written, so a later run rewrites the same item
                    log.warning("some written messages could not be deleted from the queue")
        # Failed ones are visible again at once, for the next run, not after the timeout.
        for start in range(0, len(failed), 10):
            await sqs.change_message_visibility_batch(
                QueueUrl=url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": 0}
                    for i, handle in enumerate(failed[start : start + 10])
                ],
            )

    async def _receive(self, sqs: Any, url: str, seen: set[str]) -> list[dict[str, Any]]:
        """Up to SQS_ROUND messages not seen before in this run (a slow run may see its own
        failed messages come back after the visibility timeout: they are not redone)."""
        messages: list[dict[str, Any]] = []
        while len(messages) < SQS_ROUND:
            response = await sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=1,  # long polling: an empty answer means the queue is empty
                VisibilityTimeout=SQS_VISIBILITY_SECONDS,
            )
            fresh = [m for m in response.get("Messages", []) if m["MessageId"] not in seen]
            if not fresh:
                break
            seen.update(m["MessageId"] for m in fresh)
            messages += fresh
        return messages

    async def bucket(self, s3: Any, uri: str) -> None:
        location = parse_s3_uri(uri, "--from")
        prefix = f"{location.prefix}/" if location.prefix else ""
        keys: list[str] = []
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix)
        async for page in _aws_pages(f"--from {uri}", pages):
            keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(SUFFIX)]
        for key in keys:  # oldest first: the keys sort by time
            response = await s3.get_object(Bucket=location.bucket, Key=key)
            body = await response["Body"].read()
            lines = [line for line in body.decode().splitlines() if line]
            written = await self.written([parse_line(line) for line in lines])
            kept = [line for line, ok in zip(lines, written, strict=True) if not ok]
            if not kept:
                await s3.delete_object(Bucket=location.bucket, Key=key)
            elif len(kept) < len(lines):
                text = "".join(f"{line}\n" for line in kept)
                await s3.put_object(Bucket=location.bucket, Key=key, Body=text.encode())


def _origin(value: dict[str, Any], index: int) -> tuple[str, int]:
    """Shard and sequence of an entry, as the writer reports failures by; unique per call."""
    found = identity(value)
    if found is not None and found[1].isdigit():
        return found[0], int(found[1])
    return "unknown", -1 - index


async def _aws(what: str, call: Awaitable[Any]) -> Any:
    try:
        return await call
    except (BotoCoreError, ClientError) as exc:
        raise WildrydesError(f"{what}: {error_code(exc) or type(exc).__name__}: {exc}") from None


async def _aws_pages(what: str, pages: Any) -> AsyncIterator[Any]:
    try:
        async for page in pages:
            yield page
    except (BotoCoreError, ClientError) as exc:
        raise WildrydesError(f"{what}: {error_code(exc) or type(exc).__name__}: {exc}") from None


def _read(path: Path) -> bytes:
    if not path.is_file():  # locked() would create it
        raise WildrydesError(f"--from {path}: no such file")
    with locked(path) as handle:
        handle.seek(0)
        return handle.read()


def _rewrite(path: Path, snapshot: bytes, kept: bytes) -> None:
    """Replace the file with the kept entries plus whatever was appended since `snapshot` was
    read, under the lock the service appends under, so no new dead letter is lost."""
    with locked(path) as handle:
        handle.seek(0)
        current = handle.read()
        if not current.startswith(snapshot):
            raise WildrydesError(
                f"--from {path}: the file changed while redriving (another redrive?): run again"
            )
        temporary = path.with_name(f".{path.name}.redrive-{os.getpid()}")
        with temporary.open("wb") as out:
            out.write(kept + current[len(snapshot) :])
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
