"""The bound on record bytes held in memory, shared by the readers, the writers and the
aggregator's windows.

Counting records is not enough: one GetRecords page or pushed event may hold 10 MiB, and a
poller waiting on a full queue holds its whole page. So every record read is counted in bytes
from the moment its page arrives until it is written, dead-lettered or dropped.

Nobody knows a page's size before it arrives, so a reader reads only while a page of the
largest size Kinesis sends (`page_bytes`) still fits under the bound, and holds that much
reserved until the page is in (then its real size). Several pollers may fetch at once, each
with its own reservation, and the bound holds whatever they receive.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final

MAX_PAGE_BYTES: Final = 10 * 1024 * 1024
"""The most one GetRecords page holds (Kinesis answers with at most 10 MiB), and the largest
record a stream takes; a pushed SubscribeToShard event is framed as one message of about
that much, base64 inflating its records by a third."""


class ByteBudget:
    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.used = 0
        self.page_bytes = max(1, min(MAX_PAGE_BYTES, maximum // 4))
        """What one read reserves before its page arrives: a whole page of 10 MiB, or a
        quarter of a bound under 40 MiB so that several readers may still read at once (a
        page larger than that then passes such a bound by the difference)."""
        self.room = asyncio.Event()
        """Set while one more page fits: `used + page_bytes <= maximum`."""
        self.room.set()
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take(self, size: int) -> None:
        """Count `size` bytes as held (a reservation, a page just read, a window)."""
        self.used += size
        if self.used + self.page_bytes > self.maximum:
            self.room.clear()

    def give_back(self, size: int) -> None:
        self.used = max(0, self.used - size)
        if self.used + self.page_bytes <= self.maximum:
            self.room.set()
            if self._waiters:
                self.wake_waiters()

    def waiter(self) -> asyncio.Future[None]:
        """A future resolved once a page may fit again; its holder then looks again.

        Readers wait in line on one bare future each, woken only as many at a time as pages
        fit: with hundreds of shards polling together a wait on the `room` event would cost
        each of them tasks and wake all of them for each page that came back."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return future

    def wake_waiters(self) -> None:
        """Wake as many waiters as pages fit (a woken reader that no longer wants the room
        calls this again, passing its turn on)."""
        fits = (self.maximum - self.used) // self.page_bytes
        waiters = self._waiters
        while fits > 0 and waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                fits -= 1

    def limit_for(self, record_size: float, most: int) -> int:
        """How many records of about `record_size` bytes one page may ask for: `most` when the
        reservation is a whole 10 MiB page (Kinesis sends no larger), else what fits in it (at
        least 1)."""
        if self.page_bytes >= MAX_PAGE_BYTES:
            return most
        return max(1, min(most, int(self.page_bytes / max(record_size, 1.0))))
