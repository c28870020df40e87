"""The bound on record bytes held in memory, shared by the pollers and the writers.

Counting records is not enough: one GetRecords page may hold 10 MB, and a poller waiting on a
full queue holds its whole page. So every record read is counted in bytes from the moment its
page arrives until it is written, dead-lettered or dropped, and a poller asks for no more than
fits in what is left (`limit_for`), waiting while nothing fits.
"""

from __future__ import annotations

import asyncio


class ByteBudget:
    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.used = 0
        self.room = asyncio.Event()
        """Set while less than `maximum` is held."""
        self.room.set()

    def take(self, size: int) -> None:
        """Count `size` bytes as held (a page just read). May pass the bound by one page."""
        self.used += size
        if self.used >= self.maximum:
            self.room.clear()

    def give_back(self, size: int) -> None:
        self.used = max(0, self.used - size)
        if self.used < self.maximum:
            self.room.set()

    def limit_for(self, record_size: float, most: int) -> int:
        """How many records of about `record_size` bytes one page may ask for: what fits in a
        quarter of the bound and in the room left (at least 1, at most `most`). The quarter
        lets several pollers fetch at once while one page's reservation is outstanding."""
        room = min(self.maximum // 4, self.maximum - self.used)
        return max(1, min(most, int(room / max(record_size, 1.0))))
