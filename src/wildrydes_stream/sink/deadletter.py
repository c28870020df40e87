"""Dead letters: the fan-out to every configured destination, retries, and the file destination.

`DeadLetters.send` returns only once every destination has the entries durably, so the caller
may then count the records as finished. The S3 destination (an archive: it keeps records of any
size) is written first, so that an SQS message too small for a record can point at its line.
A destination failing at run time (throttled, 5xx, network, even AccessDenied) is retried with
capped backoff for as long as it fails: the caller waits, which slows the pollers
(back-pressure) instead of crashing the service or losing the record. The entry format is in
`letters.py`; the SQS and S3 destinations in `deadletter_sqs.py` and `deadletter_s3.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from wildrydes_stream.aws.retry import backoff_delay, error_code
from wildrydes_stream.config import Settings
from wildrydes_stream.errors import WildrydesError
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.envelope import DeadLetter
from wildrydes_stream.records.position import sequence_of, sub_of
from wildrydes_stream.sink.letters import RUN, dumps, entry

log = logging.getLogger(__name__)

T = TypeVar("T")

# The setting behind each destination, named in its log lines and start-up errors.
SETTING_OF = {
    "file": "deadletter_file (WILDRYDES_DEADLETTER_FILE)",
    "sqs": "deadletter_queue_url (WILDRYDES_DEADLETTER_QUEUE_URL)",
    "s3": "deadletter_s3_uri (WILDRYDES_DEADLETTER_S3_URI)",
}


@dataclass(slots=True)
class LetterBatch:
    """The letters of one `send`, their entries, and where the archive put them."""

    letters: list[DeadLetter]
    at: datetime
    entries: list[dict[str, Any]] = field(default_factory=list)
    archived_at: str | None = None
    """s3://bucket/key of the object holding the entries, line i+1 = entries[i], once written."""

    @classmethod
    def of(cls, letters: list[DeadLetter], application: str) -> LetterBatch:
        """The batch of `application`'s letters (`run` or `aggregate`: each entry names it)."""
        at = datetime.now(UTC)
        return cls(letters, at, [entry(letter, at, application) for letter in letters])


class Destination(Protocol):
    name: str
    """Metric label and key of SETTING_OF: file, sqs or s3."""
    archive: bool
    """Keeps every record whole and is written before the others, which may point at it."""

    async def check(self) -> None:
        """At start: fail with one line naming the setting if the destination is unusable."""

    async def send(self, batch: LetterBatch) -> None:
        """Store the batch durably; retry through `Retry` rather than raise."""


class Retry:
    """Calls a destination until it succeeds, counting each failure and logging it rate-limited."""

    def __init__(
        self, metrics: Metrics, base: float = 0.05, cap: float = 5.0, log_interval: float = 30.0
    ) -> None:
        self._metrics = metrics
        self._base = base
        self._cap = cap
        self._log_interval = log_interval
        self._last_logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> Retry:
        return cls(
            metrics,
            settings.backoff_base_seconds,
            settings.backoff_max_seconds,
            settings.blocked_log_interval_seconds,
        )

    async def __call__(self, destination: str, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                self.failed(destination, exc)
                attempt += 1
                await asyncio.sleep(backoff_delay(attempt, self._base, self._cap))

    def failed(self, destination: str, exc: BaseException) -> None:
        self._metrics.deadletter_failures.labels(destination).inc()
        now = time.monotonic()
        last = self._last_logged.get(destination)
        if last is not None and now - last < self._log_interval:
            self._unlogged[destination] = self._unlogged.get(destination, 0) + 1
            return
        self._last_logged[destination] = now
        log.warning(
            "dead-letter destination %s failed, retrying until it works (check %s): %s",
            destination,
            SETTING_OF[destination],
            f"{error_code(exc) or type(exc).__name__}: {exc}",
            extra={
                "destination": destination,
                "failures_not_logged": self._unlogged.pop(destination, 0),
            },
        )


class DeadLetters:
    """Every configured destination; counts what it sends.

    `application` is the service whose records these are, `run` (the table copy) or
    `aggregate`: every entry names it, so that `redrive` knows where to send the record back.
    """

    def __init__(
        self, destinations: list[Destination], metrics: Metrics, application: str = RUN
    ) -> None:
        if not destinations:
            raise ValueError("at least one dead-letter destination is needed")
        self._archives = [d for d in destinations if d.archive]
        self._others = [d for d in destinations if not d.archive]
        self._metrics = metrics
        self.application = application

    async def check(self) -> None:
        """Every destination usable, checked one after the other so the first fault is named."""
        for destination in (*self._archives, *self._others):
            await destination.check()

    async def send(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        batch = LetterBatch.of(letters, self.application)
        for archive in self._archives:
            await archive.send(batch)
        await asyncio.gather(*(d.send(batch) for d in self._others))
        for letter in letters:
            self._metrics.records_dead_lettered.labels(letter.kind).inc()
            log.warning(
                "record dead-lettered",
                extra={
                    "application": self.application,
                    "shard": letter.shard_id,
                    "sequence_number": str(sequence_of(letter.sequence)),
                    "subsequence_number": sub_of(letter.sequence),
                    "reason": letter.reason,
                },
            )


class FileDestination:
    """Appends JSON lines and fsyncs before returning."""

    name = "file"
    archive = False

    def __init__(self, path: str | os.PathLike[str], retry: Retry) -> None:
        self.path = Path(path)
        self._retry = retry
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

    async def check(self) -> None:
        """Checked when constructed (the file is opened for appending)."""

    async def send(self, batch: LetterBatch) -> None:
        text = "".join(dumps(value) + "\n" for value in batch.entries)
        async with self._lock:
            await self._retry(self.name, lambda: asyncio.to_thread(self._append, text))

    def _append(self, text: str) -> None:
        with locked(self.path) as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())


@contextlib.contextmanager
def locked(path: Path) -> Iterator[IO[bytes]]:
    """The file at `path`, opened for appending and reading under an exclusive flock.

    `redrive` rewrites the file by replacing it under this lock; a writer that waited for the
    lock meanwhile holds the old, unlinked file, so it opens the path again.
    """
    while True:
        with path.open("a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                continue
            opened = os.fstat(handle.fileno())
            if (opened.st_dev, opened.st_ino) != (current.st_dev, current.st_ino):
                continue
            yield handle
            return
