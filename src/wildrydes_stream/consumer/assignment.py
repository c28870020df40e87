"""Which leases this worker should take, give up or ask for: decisions over a lease snapshot.

Nothing here reads or writes the table. `Assignment` remembers what successive scans showed of
the other workers (whose counters move, since when a lease has stood still, since when a
hand-off to this worker is pending) and answers from that and the snapshot at hand, so every
rule a replica follows is testable with a list of leases and a clock.

Expiry is judged as KCL judges it, by our own clock: an owner renews by moving the counter, so
a counter that has not moved for lease_duration_seconds means the owner is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from wildrydes_stream.consumer.balancing import lease_to_steal
from wildrydes_stream.consumer.lease import Lease

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Taken:
    """Shards held here that the latest scan shows with another owner (or none)."""

    to_hand_over: list[str] = field(default_factory=list)
    """A hand-off was asked of this worker: finish and checkpoint, then let go."""
    to_drop: list[str] = field(default_factory=list)
    """Taken outright: stop now rather than at the next renewal."""


class Assignment:
    def __init__(
        self,
        me: str,
        lease_duration_seconds: float,
        handoff_timeout_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.me = me
        self._lease_duration = lease_duration_seconds
        self._handoff_timeout = handoff_timeout_seconds
        self._clock = clock
        self._seen: dict[str, tuple[int, float]] = {}
        """Leases as scanned: shard -> (counter, when we first saw that counter)."""
        self._renewing: set[str] = set()
        """Workers whose lease counters were seen to move: known to be alive."""
        self._hand_offs: dict[str, float] = {}
        """Shards being handed to this worker: since when (our clock)."""

    def observe(self, leases: Mapping[str, Lease]) -> None:
        """Take in a scan of the table."""
        for lease in leases.values():
            self._note(lease)
            if lease.checkpoint_owner is None:
                self._hand_offs.pop(lease.shard_id, None)

    def forget(self, shard_id: str) -> None:
        """The shard's lease was deleted."""
        self._seen.pop(shard_id, None)

    def _note(self, lease: Lease) -> None:
        seen = self._seen.get(lease.shard_id)
        if seen is None or seen[0] != lease.counter:
            if seen is not None and lease.owner:
                self._renewing.add(lease.owner)  # its counter moved under our eyes
            self._seen[lease.shard_id] = (lease.counter, self._clock())

    def expired(self, lease: Lease) -> bool:
        seen = self._seen.get(lease.shard_id)
        if seen is None or seen[0] != lease.counter:
            return False
        return self._clock() - seen[1] >= self._lease_duration

    def held_by_other(self, lease: Lease) -> bool:
        owner = lease.owner
        return owner is not None and owner != self.me and not self.expired(lease)

    def is_live(self, lease: Lease, held: Collection[str]) -> bool:
        """Held by this worker or by one still renewing it."""
        if lease.shard_id in held:
            return True
        return lease.owner is not None and not self.expired(lease)

    def takeable(self, lease: Lease) -> bool:
        """Unowned, ours (a restart under the same worker id), or expired; never while its
        previous owner is still finishing a hand-off, unless that has taken too long."""
        if lease.checkpoint_owner is not None and not self._hand_off_over(lease):
            return False
        if lease.owner is None or lease.owner == self.me:
            return True
        self._note(lease)
        expired = self.expired(lease)
        if expired:
            log.info(
                "taking expired lease",
                extra={"shard": lease.shard_id, "previous_owner": lease.owner},
            )
        return expired

    def _hand_off_over(self, lease: Lease) -> bool:
        """A hand-off is given up on after handoff_timeout_seconds (KCL's 30 s): the old
        owner died or hung; the new one reads from the last checkpoint."""
        began = self._hand_offs.setdefault(lease.shard_id, self._clock())
        over = self._clock() - began >= self._handoff_timeout
        if over:
            log.warning(
                "hand-off not finished in time, taking the lease",
                extra={"shard": lease.shard_id, "previous_owner": lease.checkpoint_owner},
            )
        return over

    def takes_allowed(self, readable: int, leases: Mapping[str, Lease], held: int) -> int:
        """How many more shards to take now: up to the fair share among the live workers, and
        no more than doubling what is held (one while holding none). Replicas starting a
        little apart then see each other in the table before one has taken everything, and
        split the shards without stealing; a lone worker holds all of them after a few looks
        (1, 2, 4, ... a `lease_poll_interval_seconds` apart)."""
        others = {
            lease.owner
            for lease in leases.values()
            if lease.owner and lease.owner != self.me and not self.expired(lease)
        }
        share = math.ceil(readable / (len(others) + 1))
        return max(0, min(share - held, max(1, held)))

    def taken(self, held: Collection[str], scanned: Mapping[str, Lease]) -> Taken:
        """Which shards held before the scan now name another owner (or none)."""
        result = Taken()
        for shard_id in held:
            lease = scanned.get(shard_id)
            if lease is not None and lease.owner != self.me:
                if lease.checkpoint_owner == self.me:
                    result.to_hand_over.append(shard_id)
                else:
                    result.to_drop.append(shard_id)
        return result

    def lease_to_ask_for(self, claimed: list[Lease], held: Collection[str]) -> Lease | None:
        """A lease to ask of a worker holding more than its share, if we hold less; None while
        the spread is fair. Only of a worker seen renewing: a dead one would never answer,
        and its leases become free once they expire anyway."""
        # What we took earlier in this round is ours, whatever the scan said.
        me = self.me
        current = [
            dataclasses.replace(lease, owner=me)
            if lease.owner != me and lease.shard_id in held
            else lease
            for lease in claimed
        ]
        # Leases already in a hand-off are spoken for.
        current = [lease for lease in current if lease.checkpoint_owner is None]

        def gone(lease: Lease) -> bool:
            owner = lease.owner
            return self.expired(lease) or (owner != self.me and owner not in self._renewing)

        return lease_to_steal(current, self.me, gone)
