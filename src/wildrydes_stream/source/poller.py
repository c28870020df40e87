"""One shard's GetRecords loop.

At most one call per `min_poll_interval_seconds` (Kinesis allows five a second per shard); polls
again at once while behind, otherwise waits the idle interval. An expired iterator is renewed
after the last record read; throttling and transient errors back off with jitter. Each page is
handled as pages.py says (registered in order, decoded, dispatched, bad records dead-lettered).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from wildrydes_stream.aws.retry import error_code
from wildrydes_stream.source.pages import (
    FIRST_RECORD_SIZE_GUESS,
    Decode,
    Dispatch,
    Progress,
    ReaderParts,
    SendDeadLetters,
    ShardReader,
)

__all__ = [
    "FIRST_RECORD_SIZE_GUESS",
    "Decode",
    "Dispatch",
    "Progress",
    "ReaderParts",
    "SendDeadLetters",
    "ShardPoller",
]

log = logging.getLogger(__name__)
# The Limit of a poll after one that found the shard caught up: at least this, twice what that
# poll read: a small page is cheap to parse when it comes; a shard that is behind again asks
# for the full page at once.
CAUGHT_UP_LIMIT = 200


class ShardPoller(ShardReader):
    def __init__(
        self,
        shard_id: str,
        client: Any,
        parts: ReaderParts,
        progress: Progress,
        hash_range: tuple[str, str] = ("", ""),
    ) -> None:
        super().__init__(shard_id, parts, progress, hash_range)
        self._client = client
        self._page_cap: int | None = None
        """The Limit of the next poll when the last one found the shard caught up."""

    async def run(
        self, checkpoint: str, since: datetime | None = None, skip_through: int | None = None
    ) -> None:
        """Read from just after `checkpoint` until stopped or the shard's end.

        `since`: for a checkpoint still at LATEST or AT_TIMESTAMP, the moment the lease started
        at. AT_TIMESTAMP reads from it; so does an iterator renewed before the first record
        under LATEST, as a new LATEST would skip what arrived in between. `skip_through`: with
        `checkpoint` at AT_SEQUENCE_NUMBER, the position (records/position.py) through which
        the user records there are done."""
        self._since = since
        self._skip_through = skip_through
        try:
            await self._read(checkpoint)
        except _Stopped:
            return

    async def _read(self, checkpoint: str) -> None:
        iterator: str | None = await self._iterator(checkpoint)
        last_call = 0.0
        attempt = 0
        # A fenced tenure (lease lost) reads nothing more: the shard's new owner reads it.
        while iterator is not None and not self._quitting() and not self._progress.fenced:
            pause = self._settings.min_poll_interval_seconds - (time.monotonic() - last_call)
            if await self._pause(pause):
                break
            limit = await self._room_for_a_page()
            if limit == 0:
                break
            last_call = time.monotonic()
            # The largest page Kinesis may answer with: the bound holds whatever comes back.
            reserved = self._budget.page_bytes
            self._budget.take(reserved)
            try:
                response = await self._client.get_records(ShardIterator=iterator, Limit=limit)
            except ClientError as exc:
                self._budget.give_back(reserved)
                if error_code(exc) == "ExpiredIteratorException":
                    log.info("iterator expired, renewing", extra={"shard": self.shard_id})
                    iterator = await self._iterator(self._last_read or self._again(checkpoint))
                    continue
                attempt = await self._back_off("GetRecords", exc, attempt)
                continue
            except BaseException as exc:
                self._budget.give_back(reserved)
                if not isinstance(exc, Exception):
                    raise
                attempt = await self._back_off("GetRecords", exc, attempt)
                continue
            attempt = 0
            self._blocked.succeeded("GetRecords")
            records = response.get("Records", [])
            size = self._hold_page(records, reserved)
            if records:
                await self._handle(records, size)
            behind = int(response.get("MillisBehindLatest", 0))
            self._show_behind(behind)
            iterator = response.get("NextShardIterator")
            if iterator is None:
                break
            if behind > 0 or len(records) >= limit:
                self._page_cap = None
                continue
            self._page_cap = max(CAUGHT_UP_LIMIT, 2 * len(records))
            if not records:
                self.caught_up.set()
            idle = self._settings.idle_poll_interval_seconds
            if await self._pause(idle, coalesce=True):
                break
        if iterator is None:
            log.info("shard read to its end", extra={"shard": self.shard_id})
            self._progress.end()
            self.caught_up.set()

    async def _room_for_a_page(self) -> int:
        """The Limit of the next GetRecords: as many records as fit in the byte bound, after
        waiting while nothing does; 0 when stopping."""
        if not await self._wait_for_room():
            return 0
        most = self._settings.get_records_limit
        if self._page_cap is not None:
            most = min(most, self._page_cap)
        return self._budget.limit_for(self._record_size, most)

    def _again(self, checkpoint: str) -> str:
        """Where to ask for an iterator again when nothing has been read yet."""
        if checkpoint == "LATEST" and self._since is not None:
            return "AT_TIMESTAMP"
        return checkpoint

    async def _iterator(self, position: str) -> str | None:
        """A shard iterator just after `position` (a sequence number) or at a sentinel."""
        kwargs: dict[str, Any] = {
            "StreamName": self._settings.stream_name,
            "ShardId": self.shard_id,
        }
        if position.isdigit():
            kwargs |= {
                "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
                "StartingSequenceNumber": position,
            }
        elif position.startswith("AT_SEQUENCE_NUMBER:"):
            kwargs |= {
                "ShardIteratorType": "AT_SEQUENCE_NUMBER",
                "StartingSequenceNumber": position.partition(":")[2],
            }
        elif position == "AT_TIMESTAMP":
            kwargs |= {
                "ShardIteratorType": "AT_TIMESTAMP",
                "Timestamp": self._since or self._settings.starting_datetime(),
            }
        else:
            kwargs["ShardIteratorType"] = position
        attempt = 0
        while True:
            try:
                response = await self._client.get_shard_iterator(**kwargs)
            except Exception as exc:
                # Every fault is retried (a permission fixed, a stream recreated); the blocked
                # ones are reported so an operator sees them.
                where = f"{position} {kwargs['Timestamp']}" if "Timestamp" in kwargs else position
                attempt = await self._back_off("GetShardIterator", exc, attempt, where)
                if self._stopping.is_set():
                    raise _Stopped from None
                continue
            self._blocked.succeeded("GetShardIterator")
            return response.get("ShardIterator")  # type: ignore[no-any-return]


class _Stopped(Exception):
    """Stopping while waiting to retry: leave without reading, and without ending the shard."""
