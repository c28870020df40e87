"""How fast the writers may go: adaptive concurrency (AIMD) and a write-unit budget.

Throttling means the table takes less than is sent. Retrying at the same concurrency only
hammers it, so the number of BatchWriteItem calls in flight is cut in half on a throttle
(once per window: the calls already in flight when it was cut do not cut it again) and raised
by one per window of successful calls, as TCP does. A provisioned table can also be given a
budget of write units a second, spent before each call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator


class AdaptiveConcurrency:
    def __init__(self, maximum: int, minimum: int = 1) -> None:
        self.maximum = maximum
        self.minimum = minimum
        self.limit = float(maximum)
        self._in_flight = 0
        self._window = 0
        """Bumped on every cut: a throttle seen by a call started before it is old news."""
        self._waiters: deque[asyncio.Future[None]] = deque()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[int]:
        """Hold one of the `limit` slots; yields the window the call starts in."""
        while self._in_flight >= int(self.limit):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # pass on the wake-up this waiter will not use
                raise
        self._in_flight += 1
        try:
            yield self._window
        finally:
            self._in_flight -= 1
            self._wake()

    def throttled(self, window: int) -> None:
        """A call started in `window` was throttled: halve the limit once for that window."""
        if window == self._window:
            self.limit = max(float(self.minimum), self.limit / 2)
            self._window += 1

    def succeeded(self) -> None:
        """A call went through: one more slot per `limit` successes."""
        if self.limit < self.maximum:
            self.limit = min(float(self.maximum), self.limit + 1 / self.limit)
            self._wake()

    def _wake(self) -> None:
        free = int(self.limit) - self._in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


class WriteUnitBudget:
    """A token bucket of write units: `rate` a second, up to one second's worth saved up."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def spend(self, units: float) -> None:
        """Wait until `units` can be spent (at once when there is no budget). A request larger
        than the bucket waits for a full bucket and leaves a debt, so it is never refused."""
        if self.rate <= 0:
            return
        async with self._lock:  # first come, first served
            while True:
                now = time.monotonic()
                self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                needed = min(units, self.rate)
                if self._tokens >= needed:
                    self._tokens -= units
                    return
                await asyncio.sleep((needed - self._tokens) / self.rate)
