"""Putting a fleet's readings on a Kinesis stream, once per simulated second.

Tick k carries the readings for simulated time `start + k` seconds (start: now, UTC) and is
due at `k / speed` real seconds after the start, so `speed` 60 puts a simulated minute a real
second. A tick that falls behind (a slow or throttled stream) is put at once and nothing is
skipped: StatusTime stays on whole simulated seconds either way.

One unicorn goes out with PutRecord, as the workshop's Go producer did (so the IAM permission
it needed still suffices); a fleet with PutRecords in batches of up to 500. Throttling and
transient faults are retried with capped exponential backoff, and only the entries that failed
are sent again, so each reading lands once. Anything else (a missing stream, no permission,
bad credentials, an endpoint it cannot connect to before the first record is in) stops the run
with one line saying what.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from random import Random
from typing import Any, TextIO

from botocore.exceptions import ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from wildrydes_stream.aws.retry import (
    THROTTLING_CODES,
    TRANSIENT_CODES,
    backoff_delay,
    describe_error,
    error_code,
    fault_of,
)
from wildrydes_stream.errors import MissingResourceError, WildrydesError
from wildrydes_stream.produce.model import NAMES, Reading, Unicorn
from wildrydes_stream.produce.packing import ShardMap, pack

BATCH_LIMIT = 500  # PutRecords takes at most 500 records a call
BACKOFF_BASE_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0
# Per-record failures PutRecords reports; anything else (KMS errors) needs an operator.
RETRIED_ENTRY_CODES = THROTTLING_CODES | TRANSIENT_CODES


@dataclass(frozen=True)
class ProduceOptions:
    stream: str = "wildrydes"
    name: str = "Shadowfax"
    unicorns: int = 1
    speed: float = 1.0
    count: int | None = None
    """Stop after this many records in all."""
    duration: float | None = None
    """Stop after this many real seconds."""
    quiet: bool = False
    seed: int | None = None
    kpl: int = 1
    """Readings packed into one Kinesis record in the KPL's aggregate format (1: plain)."""


def fleet_names(first: str, unicorns: int) -> list[str]:
    """`first`, then the other workshop names, then numbered ones: `unicorns` distinct names."""
    others = [n for n in NAMES if n != first]
    names = [first, *others][:unicorns]
    names += [f"{NAMES[i % len(NAMES)]}-{i}" for i in range(len(names), unicorns)]
    return names


@dataclass
class Stats:
    put: int = 0
    retries: int = 0
    """PutRecord(s) calls sent again after a throttle, a transient fault or failed entries."""
    abandoned: int = 0
    """Readings not put because a stop came while they were waiting for a retry."""
    started: float = field(default_factory=time.monotonic)

    def line(self, stream: str) -> str:
        seconds = time.monotonic() - self.started
        text = f"put {self.put} records on {stream} in {seconds:.1f} s, {self.retries} retries"
        if self.abandoned:
            text += f", {self.abandoned} not put (stopped while retrying)"
        return text


class Producer:
    def __init__(self, kinesis: Any, options: ProduceOptions, out: TextIO = sys.stdout) -> None:
        self._kinesis = kinesis
        self._options = options
        self._out = out
        self._stop = asyncio.Event()
        rng = Random(options.seed)
        self.unicorns = [Unicorn(n, rng) for n in fleet_names(options.name, options.unicorns)]
        self.stats = Stats()
        self._shards: ShardMap | None = None

    def request_stop(self) -> None:
        """Stop after the call in flight (signal handlers call this)."""
        self._stop.set()

    async def run(self) -> Stats:
        options = self._options
        start = datetime.now(UTC)
        self.stats = Stats()
        if options.duration is not None:
            asyncio.get_running_loop().call_later(options.duration, self._stop.set)
        try:
            await self._ticks(start)
        finally:
            if not options.quiet and self.stats.put:
                self._out.write("\n")  # ends the line of dots, also before an error line
                self._out.flush()
        self._out.write(self.stats.line(options.stream) + "\n")
        self._out.flush()
        return self.stats

    async def _ticks(self, start: datetime) -> None:
        options = self._options
        tick = 0
        while not self._stop.is_set():
            at = start + timedelta(seconds=tick)
            readings = [u.reading(at) for u in self.unicorns]
            if options.count is not None:
                readings = readings[: options.count - self.stats.put]
            for first in range(0, len(readings), BATCH_LIMIT):
                if self._stop.is_set():
                    break
                await self._put(readings[first : first + BATCH_LIMIT])
            if options.count is not None and self.stats.put >= options.count:
                return
            tick += 1
            await self._wait(self.stats.started + tick / options.speed - time.monotonic())

    async def _wait(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _put(self, readings: Sequence[Reading]) -> None:
        """Put until every reading is in, or a stop comes while some wait for a retry."""
        pending = list(readings)
        attempt = 0
        while True:
            waiting = len(pending)
            try:
                pending = await self._send(pending)
            except ClientError as exc:
                if fault_of(exc) not in ("throttle", "transient"):
                    raise self._fatal(exc) from None
            except Exception as exc:
                if fault_of(exc) != "transient" or self._unreachable(exc):
                    raise
            # Outside the try: stdout failing (a closed pipe) is not a failed put to retry.
            self._done(waiting - len(pending))
            if not pending:
                return
            if self._stop.is_set():
                self.stats.abandoned += len(pending)
                return
            await self._wait(backoff_delay(attempt, BACKOFF_BASE_SECONDS, BACKOFF_MAX_SECONDS))
            attempt += 1
            self.stats.retries += 1

    def _unreachable(self, exc: BaseException) -> bool:
        """No connection before anything was put: a wrong endpoint or region, or no network.
        Retrying would only hide it (the run would print nothing but a summary at Ctrl-C);
        once records went in, a connection failing is a blip and is retried."""
        return self.stats.put == 0 and isinstance(exc, BotoConnectionError)

    async def _send(self, readings: list[Reading]) -> list[Reading]:
        """One call; returns the readings still to put."""
        stream = self._options.stream
        if self._options.kpl > 1:
            return await self._send_packed(readings)
        if len(readings) == 1 and self._options.unicorns == 1:
            reading = readings[0]
            await self._kinesis.put_record(
                StreamName=stream, Data=reading.encode(), PartitionKey=reading.name
            )
            return []
        response = await self._kinesis.put_records(
            StreamName=stream,
            Records=[{"Data": r.encode(), "PartitionKey": r.name} for r in readings],
        )
        failed = []
        for reading, result in zip(readings, response["Records"], strict=True):
            code = result.get("ErrorCode")
            if code is None:
                continue
            if code not in RETRIED_ENTRY_CODES:
                raise WildrydesError(
                    f"PutRecords refused a record of {reading.name} on stream {stream}: "
                    f"{code}: {result.get('ErrorMessage', '')}"
                )
            failed.append(reading)
        return failed

    async def _send_packed(self, readings: list[Reading]) -> list[Reading]:
        """Readings in KPL aggregates, one PutRecords call; returns the readings of the
        aggregates to put again."""
        stream = self._options.stream
        if self._shards is None:
            self._shards = await ShardMap.of(self._kinesis, stream)
        packed = pack(readings, self._options.kpl, self._shards)
        response = await self._kinesis.put_records(
            StreamName=stream, Records=[p.entry() for p in packed]
        )
        failed: list[Reading] = []
        for aggregate, result in zip(packed, response["Records"], strict=True):
            code = result.get("ErrorCode")
            if code is None:
                continue
            if code not in RETRIED_ENTRY_CODES:
                raise WildrydesError(
                    f"PutRecords refused an aggregate of {len(aggregate.readings)} readings on "
                    f"stream {stream}: {code}: {result.get('ErrorMessage', '')}"
                )
            failed.extend(aggregate.readings)
        return failed

    def _done(self, records: int) -> None:
        self.stats.put += records
        if not self._options.quiet and records:
            self._out.write("." * records)
            self._out.flush()

    def _fatal(self, exc: ClientError) -> WildrydesError:
        stream = self._options.stream
        region = self._kinesis.meta.region_name
        if error_code(exc) == "ResourceNotFoundException":
            return MissingResourceError(
                f"stream {stream} not found in {region}: create it, or name another with -stream"
            )
        return WildrydesError(f"putting records on stream {stream} failed: {describe_error(exc)}")
