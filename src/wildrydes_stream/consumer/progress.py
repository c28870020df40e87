"""Per-shard progress: the highest sequence number below which every record is finished.

Records are registered in shard order as the poller reads them and marked finished by writers
and the dead-letter path in any order. The checkpoint only ever covers the contiguous prefix of
finished records, so a record still in flight holds it back however far its neighbours got.
"""

from __future__ import annotations

import asyncio
from collections import deque
from itertools import pairwise


class ShardProgress:
    def __init__(self, shard_id: str) -> None:
        self.shard_id = shard_id
        self._pending: deque[int] = deque()
        self._finished: set[int] = set()
        self._ended = False
        self._fenced = False
        self.checkpoint: int | None = None
        """Highest sequence number of the finished prefix; None until one record finishes."""
        self.drained = asyncio.Event()
        """Set whenever nothing registered is still in flight."""
        self.drained.set()

    @property
    def fenced(self) -> bool:
        """The lease of this tenure was lost: nothing of it may be written or checkpointed."""
        return self._fenced

    def fence(self) -> None:
        """Stop counting anything for this tenure; queued records see `fenced` and are dropped,
        and late acknowledgements are ignored (so nothing is kept for them)."""
        self._fenced = True
        self._pending.clear()
        self._finished.clear()
        self.drained.set()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def ended(self) -> bool:
        """The shard was read to its end and nothing more will be registered."""
        return self._ended

    @property
    def at_shard_end(self) -> bool:
        """Read to the end and every record finished: SHARD_END may be checkpointed."""
        return self._ended and not self._pending

    def register(self, sequence: int) -> None:
        """A record was read; sequence numbers must arrive in increasing order."""
        if self._fenced:
            return
        if self._ended:
            raise RuntimeError(f"shard {self.shard_id} already ended")
        if self._pending and sequence <= self._pending[-1]:
            raise ValueError(f"sequence {sequence} registered out of order on {self.shard_id}")
        self._pending.append(sequence)
        self.drained.clear()

    def register_many(self, sequences: list[int]) -> None:
        """A page of records was read, in increasing order."""
        if self._fenced or not sequences:
            return
        if self._ended:
            raise RuntimeError(f"shard {self.shard_id} already ended")
        pending = self._pending
        first = sequences[0]
        if (pending and first <= pending[-1]) or any(
            later <= earlier for earlier, later in pairwise(sequences)
        ):
            raise ValueError(f"sequences registered out of order on {self.shard_id}")
        pending.extend(sequences)
        self.drained.clear()

    def finish(self, sequence: int) -> None:
        """A record is durably written or dead-lettered."""
        if self._fenced:
            return
        self._finished.add(sequence)
        pending, finished = self._pending, self._finished
        while pending and pending[0] in finished:
            done = pending.popleft()
            finished.discard(done)
            self.checkpoint = done
        if not pending:
            self.drained.set()

    def end(self) -> None:
        """The shard is closed and was read to its end."""
        self._ended = True
