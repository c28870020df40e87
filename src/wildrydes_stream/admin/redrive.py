"""`wildrydes-stream redrive --from FILE|SQS-URL|S3-URI`: dead letters back where they were going.

Each entry names the application that dead-lettered it (sink/letters.py). `run`'s records go
through the table copy's own decoding (`decode_item`) and writing path (`WriterPool`) into the
table. `aggregate`'s go back onto the stream the entry names, through the aggregator's own
Kinesis writer (`StreamWriter`), partition key = the record's Name: a raw reading onto
`raw_stream_name`, where it was read (after `decode_reading` accepts it), a window it could not
put onto `stream_name` (after `decode_item` accepts it, as `run` will).

A run is planned before anything is sent: the whole source is read once, and a source holding
letters of both applications (unless `--application` picks one; the others stay), of an
application this version does not know, or of a stream the settings do not name for that
application, is refused with one line and left as it was.

What is written leaves its source; what fails again, or still cannot be decoded, stays there
unchanged: the file is rewritten atomically with only those entries, SQS messages are deleted
once their record is written, S3 objects are deleted once every record in them is written and
rewritten with the others otherwise. A second run finds only what still failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from wildrydes_stream.aggregate.readings import decode_reading
from wildrydes_stream.aws.clients import AwsClients
from wildrydes_stream.aws.retry import error_code
from wildrydes_stream.config import Settings
from wildrydes_stream.copy.item import decode_item
from wildrydes_stream.errors import RecordError, WildrydesError
from wildrydes_stream.observability.health import BlockedCalls
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.envelope import DeadLetter, Envelope, Item, ItemKey
from wildrydes_stream.records.position import position
from wildrydes_stream.sink.deadletter import DeadLetters, LetterBatch, locked
from wildrydes_stream.sink.deadletter_s3 import SUFFIX
from wildrydes_stream.sink.dynamodb import WriterPool
from wildrydes_stream.sink.kinesis import StreamRecord, StreamWriter
from wildrydes_stream.sink.letters import (
    AGGREGATE,
    RUN,
    Pointer,
    application_of,
    identity,
    parse_line,
    parse_s3_uri,
    payload,
)

log = logging.getLogger(__name__)

APPLICATIONS: Final = (RUN, AGGREGATE)

# Messages taken per round, and how long they stay hidden from other consumers meanwhile
# (covers one round's writes with their retries; failed ones are made visible again at once).
SQS_ROUND: Final = 100
SQS_VISIBILITY_SECONDS: Final = 300

Entry = dict[str, Any]


@dataclass
class Report:
    source: str
    written_to: dict[str, int] = field(default_factory=dict)
    """Records written per destination ("table T", "stream S"), in the order first met."""
    failed: int = 0
    left: int = 0
    """Letters of another application than `--application` names: not sent, they stay."""
    strangers: int = 0
    """Lines (messages) that are not dead-letter entries at all: left as they were."""

    @property
    def written(self) -> int:
        return sum(self.written_to.values())

    def line(self) -> str:
        if self.left:
            where = "the failed and unsent ones stay there"
        else:
            where = "the failed ones stay there" if self.failed else "nothing left"
        unsent = f", {self.left} of other applications not sent" if self.left else ""
        if self.strangers:
            unsent += f", {self.strangers} not dead-letter entries (left as they were)"
        return (
            f"redrive from {self.source}: {self._written()}, {self.failed} failed again"
            f"{unsent} ({where})"
        )

    def _written(self) -> str:
        targets = list(self.written_to.items())
        if not targets:
            return "0 records written"
        if len(targets) == 1:
            [(target, count)] = targets
            return f"{count} records written to {target}"
        each = ", ".join(f"{count} to {target}" for target, count in targets)
        return f"{self.written} records written ({each})"


async def redrive(
    settings: Settings, source: str, max_retry_attempts: int, application: str | None = None
) -> Report:
    """Send the letters of `source` back (only `application`'s, when given); refuses with
    WildrydesError, before sending anything, a source it cannot send back as a whole."""
    # A finite cap by default so the command ends; record age means nothing here.
    settings = settings.replace(max_retry_attempts=max_retry_attempts, max_record_age_seconds=-1.0)
    async with AwsClients() as clients:
        origin: Source
        if source.startswith("s3://"):
            origin = BucketSource(clients.s3, source)
        elif source.startswith(("https://", "http://")):
            origin = QueueSource(clients.sqs, source)
        else:
            origin = FileSource(Path(source))
        held: Counter[tuple[str, str]] = Counter()
        strangers = 0
        async for values in origin.survey():
            kinds = [kind_of(v, settings) for v in values]
            held.update(kind for kind in kinds if kind)
            strangers += kinds.count(None)
        if strangers and not held:
            raise WildrydesError(
                f"--from {source} holds no dead-letter entries ({strangers} lines or messages, "
                "none a JSON entry with a stream): nothing was sent; give the destination "
                "deadletter_file, deadletter_queue_url or deadletter_s3_uri names"
            )
        plan = Plan.of(held, settings, source, application)
        report = Report(source, {target.label: 0 for target in plan.expected})
        async with Writers(clients, settings) as writers:
            redriver = Redriver(settings, plan, writers, Payloads(clients.s3), report)
            await origin.redrive(redriver)
        return report


# --- what a source holds and where each letter goes ----------------------------------------


def kind_of(value: Entry | None, settings: Settings) -> tuple[str, str] | None:
    """(application, stream) of an entry; None when it is not one (it stays where it is)."""
    if value is None or not isinstance(value.get("stream"), str):
        return None
    return application_of(value, settings.raw_stream_name), value["stream"]


@dataclass(frozen=True, slots=True)
class Target:
    """Where letters go back: the table, or a stream (raw readings, or windows for `run`)."""

    label: str
    decoder: Literal["item", "reading"]
    """What must accept the record first: `decode_item` (as `run`) or `decode_reading`."""
    stream: str | None = None
    """None: the table."""


def targets_of(application: str, settings: Settings) -> dict[str, Target]:
    """{letter's stream: where it goes} for the letters of `application`."""
    s = settings
    if application == RUN:
        return {s.stream_name: Target(f"table {s.table_name}", "item")}
    if application == AGGREGATE:
        return {
            s.raw_stream_name: Target(f"stream {s.raw_stream_name}", "reading", s.raw_stream_name),
            s.stream_name: Target(f"stream {s.stream_name}", "item", s.stream_name),
        }
    return {}


class Plan:
    """The one application a run sends letters of, and where each of its streams' letters go."""

    def __init__(self, settings: Settings, application: str | None, expected: list[Target]) -> None:
        self._settings = settings
        self.application = application
        self._targets = targets_of(application, settings) if application else {}
        self.expected = expected
        """The targets of the letters the survey found (named in the report even at 0)."""

    @classmethod
    def of(
        cls,
        held: Counter[tuple[str, str]],
        settings: Settings,
        source: str,
        only: str | None,
    ) -> Plan:
        """The plan for a source holding `held` letters per (application, stream), or
        WildrydesError saying why nothing will be sent."""
        if only is not None:
            held = Counter({kind: n for kind, n in held.items() if kind[0] == only})
        per_application = Counter[str]()
        for (application, _), count in held.items():
            per_application[application] += count
        what = f"--from {source}"
        if len(per_application) > 1:
            known = " or ".join(f"--application {a}" for a in APPLICATIONS)
            raise WildrydesError(
                f"{what} holds dead letters of {_counts(per_application)}: nothing was sent; "
                f"redrive one application's at a time with {known} (the others stay)"
            )
        if not per_application:
            return cls(settings, only, [])
        [application] = per_application
        if application not in APPLICATIONS:
            raise WildrydesError(
                f"{what} holds dead letters of application {application!r} "
                f"({per_application[application]}), which this version cannot redrive: nothing "
                "was sent; redrive them with the version that wrote them"
            )
        targets = targets_of(application, settings)
        streams = Counter({stream: n for (_, stream), n in held.items()})
        foreign = Counter({stream: n for stream, n in streams.items() if stream not in targets})
        if foreign:
            raise WildrydesError(f"{what} holds {_foreign(application, foreign, settings)}")
        expected = [target for stream, target in targets.items() if stream in streams]
        return cls(settings, application, expected)

    def target(self, value: Entry) -> Target | None:
        """Where this run sends the entry; None when it is another application's."""
        kind = kind_of(value, self._settings)
        if kind is None or kind[0] != self.application:
            return None
        return self._targets.get(kind[1])


def _counts(counts: Counter[str], quoted: bool = False) -> str:
    """`run (41) and aggregate (3)`, the most first; names not of an application quoted."""
    parts = [
        f"{name!r} ({n})" if quoted or name not in APPLICATIONS else f"{name} ({n})"
        for name, n in counts.most_common()
    ]
    return ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else parts[0]


def _foreign(application: str, foreign: Counter[str], settings: Settings) -> str:
    """The refusal of letters of streams the settings do not name for their application."""
    streams = ("streams " if len(foreign) > 1 else "stream ") + _counts(foreign, quoted=True)
    if application == RUN:
        return (
            f"run's dead letters of {streams} but stream_name is "
            f"{settings.stream_name!r}: nothing was sent; set stream_name "
            "(WILDRYDES_STREAM_NAME) to the stream they were read from"
        )
    return (
        f"aggregate's dead letters of {streams} but raw_stream_name is "
        f"{settings.raw_stream_name!r} (and stream_name {settings.stream_name!r}): nothing was "
        "sent; set raw_stream_name (WILDRYDES_RAW_STREAM_NAME) to the stream they were read from"
    )


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

    def take(self) -> list[DeadLetter]:
        letters, self.letters = self.letters, []
        return letters


class Writers:
    """The services' own writers, kept to this one class (their internals change
    independently): the table copy's WriterPool, and the aggregator's StreamWriter per stream.
    A record failing again comes back as a dead letter, to the command only."""

    def __init__(self, clients: AwsClients, settings: Settings) -> None:
        self._kinesis = clients.kinesis
        self._settings = settings
        self._collect = _Collect()
        self._metrics = Metrics()
        self._deadletters = DeadLetters([self._collect], self._metrics)
        self._blocked = BlockedCalls(self._metrics, settings.blocked_log_interval_seconds)
        self._failure: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._pool = WriterPool(
            clients.dynamodb_data, settings, self._deadletters, self._metrics, self._fail
        )
        self._streams: dict[str, StreamWriter] = {}

    def _fail(self, exc: BaseException) -> None:
        if not self._failure.done():
            self._failure.set_result(exc)

    async def __aenter__(self) -> Writers:
        self._pool.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._pool.stop()
        for writer in self._streams.values():
            await writer.stop()

    async def write(self, envelopes: list[Envelope]) -> list[DeadLetter]:
        """Write every envelope into the table; the dead letters of those that failed again."""

        async def put_all() -> None:
            for envelope in envelopes:
                await self._pool.put(envelope)
            await self._pool.drain()

        await self._until_done(put_all(), "writing to the table")
        return self._collect.take()

    async def put(self, records: list[tuple[str, StreamRecord]]) -> list[DeadLetter]:
        """Put every (stream, record); the dead letters of those that failed again."""

        async def put_all() -> None:
            for stream, record in records:
                await self._stream(stream).submit([record])
            for writer in self._streams.values():
                await writer.drain()

        await self._until_done(put_all(), "putting records on the stream")
        return self._collect.take()

    def _stream(self, stream: str) -> StreamWriter:
        writer = self._streams.get(stream)
        if writer is None:
            writer = StreamWriter(
                self._kinesis,
                stream,
                self._settings,
                self._deadletters,
                self._metrics,
                self._blocked,
                self._fail,
            )
            writer.start()
            self._streams[stream] = writer
        return writer

    async def _until_done(self, work: Coroutine[Any, Any, None], what: str) -> None:
        task: asyncio.Future[Any] = asyncio.ensure_future(work)
        # A writer dying would leave drain() waiting forever: stop on it instead.
        failure: asyncio.Future[Any] = self._failure
        await asyncio.wait({task, failure}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            raise WildrydesError(f"{what} failed: {self._failure.result()!r}")
        task.result()


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
        self, settings: Settings, plan: Plan, writers: Writers, payloads: Payloads, report: Report
    ) -> None:
        self._settings = settings
        self._plan = plan
        self._writers = writers
        self._payloads = payloads
        self.report = report

    async def written(self, values: list[Entry | None]) -> list[bool]:
        """For each entry, whether its record is now where it was going (so the entry leaves
        its source); counts every outcome."""
        envelopes: list[Envelope] = []
        records: list[tuple[str, StreamRecord]] = []
        sent: dict[int, tuple[Target, _Ack, tuple[str, int]]] = {}
        for index, value in enumerate(values):
            if value is None or kind_of(value, self._settings) is None:
                self._stranger()
                continue
            target = self._plan.target(value)
            if target is None:
                # Another application's (--application), or one sent since the survey.
                self.report.left += 1
                continue
            data = await self._payloads.of(value)
            if data is None:
                self._stays(_no_data(value))
                continue
            try:
                key, item = self._decode(target, data)
            except RecordError as exc:
                self._stays(str(exc))
                continue
            shard, sequence = _origin(value, index)
            ack = _Ack()
            sent[index] = (target, ack, (shard, sequence))
            if target.stream is None:
                envelopes.append(Envelope(shard, sequence, key, item, time.time(), data, ack))
            else:  # partition key = the Name, as the producer and the aggregator put records
                record = StreamRecord(str(index), key[0], data, shard, ack, [sequence])
                records.append((target.stream, record))
        failed: list[DeadLetter] = []
        if envelopes:
            failed += await self._writers.write(envelopes)
        if records:
            failed += await self._writers.put(records)
        again = {(letter.shard_id, letter.sequence) for letter in failed}
        result = [False] * len(values)
        for index, (target, ack, origin) in sent.items():
            if ack.done and origin not in again:
                result[index] = True
                written = self.report.written_to
                written[target.label] = written.get(target.label, 0) + 1
            else:
                self.report.failed += 1
        return result

    def _decode(self, target: Target, data: bytes) -> tuple[ItemKey, Item]:
        """The record's key and table item, or RecordError when the application that reads
        it next (`aggregate` for a reading, `run` otherwise) would refuse it too."""
        if target.decoder == "reading":
            return decode_reading(data)[0], {}
        return decode_item(data, self._settings.status_time_format)

    def _stays(self, reason: str) -> None:
        self.report.failed += 1
        log.warning("dead letter cannot be written, it stays", extra={"reason": reason})

    def _stranger(self) -> None:
        # Never a dead letter (not JSON, or no `stream`): not a failure of this run.
        self.report.strangers += 1
        log.warning("not a dead-letter entry, left as it was")


def _no_data(value: Entry) -> str:
    """Why an entry gave no record to send."""
    if isinstance(value.get("data_base64"), str):
        return "its data_base64 is not valid base64 (the entry was changed or cut short)"
    uri = value.get("data_s3_uri")
    if isinstance(uri, str):
        return (
            f"the S3 object it points at ({uri}, line {value.get('data_s3_line')}) is gone or "
            "no longer holds its record"
        )
    return "it holds no record data (no data_base64, data or data_s3_uri: the record was not kept)"


# --- sources: read once to plan the run, then redriven ------------------------------------


class Source(Protocol):
    def survey(self) -> AsyncIterator[list[Entry | None]]:
        """Every entry the source holds, in chunks; the source as it was afterwards."""
        ...

    async def redrive(self, redriver: Redriver) -> None:
        """Send back what the source holds; remove what was written, keep the rest."""
        ...


class FileSource:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._snapshot = b""
        self._lines: list[str] = []

    async def survey(self) -> AsyncIterator[list[Entry | None]]:
        self._snapshot = await asyncio.to_thread(_read, self._path)
        text = self._snapshot.decode("utf-8", "surrogateescape")
        self._lines = [line for line in text.splitlines() if line]
        yield [parse_line(line) for line in self._lines]

    async def redrive(self, redriver: Redriver) -> None:
        lines = self._lines
        written = await redriver.written([parse_line(line) for line in lines])
        kept = "".join(f"{line}\n" for line, done in zip(lines, written, strict=True) if not done)
        kept_bytes = kept.encode("utf-8", "surrogateescape")
        await asyncio.to_thread(_rewrite, self._path, self._snapshot, kept_bytes)


class QueueSource:
    """The survey receives every message (hidden meanwhile) and makes them visible again;
    the redrive then takes them in rounds. Messages sent after the survey are redriven too
    when they are of the planned application and streams, and stay otherwise."""

    def __init__(self, sqs: Any, url: str) -> None:
        self._sqs = sqs
        self._url = url

    async def survey(self) -> AsyncIterator[list[Entry | None]]:
        await _aws(f"--from {self._url}", self._sqs.get_queue_attributes(QueueUrl=self._url))
        seen: set[str] = set()
        handles: list[str] = []
        try:
            while messages := await self._receive(seen):
                handles += [m["ReceiptHandle"] for m in messages]
                yield [parse_line(m["Body"]) for m in messages]
        finally:
            await self._release(handles)

    async def redrive(self, redriver: Redriver) -> None:
        sqs, url = self._sqs, self._url
        seen: set[str] = set()
        failed: list[str] = []
        while messages := await self._receive(seen):
            written = await redriver.written([parse_line(m["Body"]) for m in messages])
            outcomes = list(zip(messages, written, strict=True))
            done = [m for m, ok in outcomes if ok]
            failed += [m["ReceiptHandle"] for m, ok in outcomes if not ok]
            for start in range(0, len(done), 10):
                entries = [
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                    for i, m in enumerate(done[start : start + 10])
                ]
                response = await sqs.delete_message_batch(QueueUrl=url, Entries=entries)
                if response.get("Failed"):  # sent, so a later run sends the same record again
                    log.warning("some written messages could not be deleted from the queue")
        # Failed ones are visible again at once, for the next run, not after the timeout.
        await self._release(failed)

    async def _release(self, handles: list[str]) -> None:
        for start in range(0, len(handles), 10):
            await self._sqs.change_message_visibility_batch(
                QueueUrl=self._url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": 0}
                    for i, handle in enumerate(handles[start : start + 10])
                ],
            )

    async def _receive(self, seen: set[str]) -> list[dict[str, Any]]:
        """Up to SQS_ROUND messages not seen before in this pass (a slow run may see its own
        failed messages come back after the visibility timeout: they are not redone)."""
        messages: list[dict[str, Any]] = []
        while len(messages) < SQS_ROUND:
            response = await self._sqs.receive_message(
                QueueUrl=self._url,
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


class BucketSource:
    """The objects under the prefix when the survey lists them, oldest first; each is read
    by the survey and again by the redrive (only one object is held at a time)."""

    def __init__(self, s3: Any, uri: str) -> None:
        self._s3 = s3
        self._uri = uri
        self._bucket = ""
        self._keys: list[str] = []

    async def survey(self) -> AsyncIterator[list[Entry | None]]:
        location = parse_s3_uri(self._uri, "--from")
        self._bucket = location.bucket
        prefix = f"{location.prefix}/" if location.prefix else ""
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=location.bucket, Prefix=prefix
        )
        async for page in _aws_pages(f"--from {self._uri}", pages):
            self._keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(SUFFIX)]
        for key in self._keys:  # oldest first: the keys sort by time
            yield [parse_line(line) for line in await self._lines(key)]

    async def redrive(self, redriver: Redriver) -> None:
        s3, bucket = self._s3, self._bucket
        for key in self._keys:
            lines = await self._lines(key)
            written = await redriver.written([parse_line(line) for line in lines])
            kept = [line for line, ok in zip(lines, written, strict=True) if not ok]
            if not kept:
                await s3.delete_object(Bucket=bucket, Key=key)
            elif len(kept) < len(lines):
                text = "".join(f"{line}\n" for line in kept)
                await s3.put_object(Bucket=bucket, Key=key, Body=text.encode())

    async def _lines(self, key: str) -> list[str]:
        response = await self._s3.get_object(Bucket=self._bucket, Key=key)
        body: bytes = await response["Body"].read()
        return [line for line in body.decode().splitlines() if line]


def _origin(value: dict[str, Any], index: int) -> tuple[str, int]:
    """Shard and sequence of an entry, as the writer reports failures by; unique per call."""
    shard, sequence = value.get("shard_id"), value.get("sequence_number")
    sub = value.get("subsequence_number", 0)
    if isinstance(shard, str) and isinstance(sequence, str) and sequence.isdigit():
        return shard, position(int(sequence), sub if isinstance(sub, int) else 0)
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
    if path.is_dir():
        raise WildrydesError(
            f"--from {path} is a directory: give the dead-letter file in it (deadletter_file "
            "names it)"
        )
    if not path.is_file():  # locked() would create it
        raise WildrydesError(f"--from {path}: no such file")
    try:
        with locked(path) as handle:
            handle.seek(0)
            return handle.read()
    except OSError as exc:
        raise WildrydesError(f"--from {path} cannot be read: {exc.strerror or exc}") from None


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
