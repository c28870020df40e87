"""One shard read by enhanced fan-out: SubscribeToShard subscriptions, one after another.

Kinesis pushes an event as records arrive (and every few seconds when there are none), each with
the records, MillisBehindLatest and a ContinuationSequenceNumber: where the next subscription
starts (after it) to go on from that event. A subscription ends after about 5 minutes; it is
renewed at once from the last continuation. A failed one (ResourceInUseException within 5 s of
the last, LimitExceededException, throttling, expired credentials, a reset connection, no
event for `stall_seconds`) is retried with backoff from the last continuation of an event that
was handed on, so nothing is skipped, and nothing is read twice but the records of an event cut
off mid-way (never handed on).

Back-pressure: once the first bytes of the next message say how long it is, the rest is read
only when the byte bound has room for it (the message is held from then on), so with the sink
full the stream is not read, HTTP/2 flow control stops the server after one stream window
(aws/h2.py), and memory stays within `max_buffered_bytes` (plus that window a shard) even for
events of 10 MiB of records.

An event with ChildShards ends the shard, as SHARD_END does when polling: the shard's progress
ends once its records are handed on, and the children are read after their parents, as today.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from wildrydes_stream.aws.fanout import FanoutClient, Stalled, Subscription, starting_position
from wildrydes_stream.aws.retry import backoff_delay, error_code
from wildrydes_stream.runtime.waiting import wait_or_timeout
from wildrydes_stream.source.pages import Progress, ReaderParts, ShardReader

log = logging.getLogger(__name__)

API: Final = "SubscribeToShard"
STALL_SECONDS: Final = 30.0
"""No event for this long and a subscription is taken for dead (Kinesis sends one every few
seconds even on an idle shard): it is closed and a new one opened from the last continuation."""
IN_USE_WAIT: Final = 1.0
"""Least wait after ResourceInUseException (a subscription of this consumer and shard opened
less than 5 s ago, or still open on the server's side)."""


@dataclass(frozen=True, slots=True)
class Fanout:
    """What every shard's subscriber reads through: the HTTP/2 client and the registered
    stream consumer."""

    client: FanoutClient
    consumer_arn: str
    stall_seconds: float = STALL_SECONDS


class _Renew(Exception):
    """The subscription ended without ending the shard: open the next one."""


class ShardSubscriber(ShardReader):
    """A shard reader with ShardPoller's interface (`run`, `halt`, `caught_up`)."""

    def __init__(
        self,
        shard_id: str,
        fanout: Fanout,
        parts: ReaderParts,
        progress: Progress,
        hash_range: tuple[str, str] = ("", ""),
    ) -> None:
        super().__init__(shard_id, parts, progress, hash_range)
        self._fanout = fanout
        self._continuation: str | None = None
        """ContinuationSequenceNumber of the last event handed on."""
        self._subscription: Subscription | None = None
        self.subscriptions = 0
        """Subscriptions opened in this tenure."""

    async def run(
        self, checkpoint: str, since: datetime | None = None, skip_through: int | None = None
    ) -> None:
        """Read from just after `checkpoint` until halted, stopped, fenced or the shard's end.

        `since`: for a checkpoint still at LATEST or AT_TIMESTAMP, the moment the lease started
        at (AT_TIMESTAMP reads from it; so does a subscription renewed before the first event
        under LATEST)."""
        self._since = since
        self._skip_through = skip_through
        reason = "start"
        attempt = 0
        ended = False
        while not self._quitting() and not self._progress.fenced:
            try:
                ended = await self._subscription_run(self._position(checkpoint), reason)
            except _Renew:
                reason, attempt = "renewal", 0
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._quitting() or self._progress.fenced:
                    break
                reason = "retry"
                attempt = await self._retry(exc, attempt)
                continue
            break
        if ended:
            log.info("shard read to its end", extra={"shard": self.shard_id})
            self._progress.end()
            self.caught_up.set()

    def halt(self) -> None:
        """Read no more: the event being handed on is finished; the subscription is closed."""
        super().halt()
        subscription = self._subscription
        if subscription is not None:
            subscription.close()

    def _position(self, checkpoint: str) -> dict[str, Any]:
        if self._continuation is not None:
            return {"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": self._continuation}
        if self._last_read is not None:
            return {"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": self._last_read}
        if checkpoint in ("LATEST", "AT_TIMESTAMP") and self._since is not None:
            # A LATEST renewed before any event would skip what arrived in between.
            return starting_position("AT_TIMESTAMP", self._since)
        if checkpoint == "AT_TIMESTAMP":
            return starting_position(checkpoint, self._settings.starting_datetime())
        return starting_position(checkpoint, None)

    async def _subscription_run(self, position: dict[str, Any], reason: str) -> bool:
        """One subscription, read until it ends: True when the shard ended (ChildShards);
        _Renew when the server ended it; False when halted or fenced."""
        fanout = self._fanout
        subscription = await fanout.client.subscribe(fanout.consumer_arn, self.shard_id, position)
        self._subscription = subscription
        self.subscriptions += 1
        self._metrics.subscriptions.labels(reason).inc()
        log.debug("subscribed", extra={"shard": self.shard_id, "reason": reason})
        try:
            if self._quitting():  # halted while subscribing
                return False
            return await self._read_events(subscription)
        finally:
            self._subscription = None
            subscription.close()

    async def _read_events(self, subscription: Subscription) -> bool:
        stall = self._fanout.stall_seconds
        subscription.watch(stall)
        try:
            while True:
                size = await subscription.message_size()
                if size is None:
                    raise _Renew
                if not await self._room_for(size):
                    return False
                # The message's bytes are held from here: the bound holds however large it is.
                reserved = min(size, self._budget.page_bytes)
                self._budget.take(reserved)
                try:
                    event = await subscription.next_message()
                except BaseException:
                    self._budget.give_back(reserved)
                    raise
                self._blocked.succeeded(API)
                if event is None:
                    self._budget.give_back(reserved)
                elif await self._take(event, reserved):
                    return True
        except Stalled as stalled:
            retired = self._fanout.client.pool.retire_if_silent(subscription.response, stall)
            raise TimeoutError(
                f"{stalled}" + (" (connection silent, closed)" if retired else "")
            ) from None

    async def _room_for(self, size: int) -> bool:
        """Wait until the byte bound has room for a message of `size` bytes; False when halted
        or fenced meanwhile. Not reading is what stops the server: its window fills and it
        waits (and the stall watch counts only time spent waiting for the server)."""
        return await self._wait_for_room() and not self._progress.fenced

    async def _take(self, event: dict[str, Any], reserved: int) -> bool:
        """Hand an event's records on (their bytes replacing the event's reservation); True
        when it ends the shard."""
        records: list[dict[str, Any]] = event.get("Records") or []
        size = self._hold_page(records, reserved)
        if records:
            await self._handle(records, size)
        continuation = event.get("ContinuationSequenceNumber")
        if continuation:
            self._continuation = continuation
        behind = int(event.get("MillisBehindLatest") or 0)
        self._show_behind(behind)
        if event.get("ChildShards"):
            return True
        if behind == 0:
            # The event reaches the tip: everything put before it is handed on.
            self.caught_up.set()
        return False

    async def _retry(self, exc: BaseException, attempt: int) -> int:
        """Wait before the next subscription; the next attempt number."""
        if error_code(exc) == "ResourceInUseException":
            # Expected after a reset (the server still holds the old subscription for a
            # moment): not an operator's problem, not reported as blocked.
            self._metrics.errors.labels(API).inc()
            log.debug("subscription in use, waiting", extra={"shard": self.shard_id})
            s = self._settings
            delay = max(IN_USE_WAIT, backoff_delay(attempt, s.backoff_base_seconds, 5.0))
            await wait_or_timeout(self._stopping, delay)
            return attempt + 1
        log.info(
            "subscription failed, resubscribing",
            extra={"shard": self.shard_id, "error": f"{type(exc).__name__}: {exc}"},
        )
        return await self._back_off(API, exc, attempt)
