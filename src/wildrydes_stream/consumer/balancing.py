"""Spreading shards across workers, as the Kinesis Client Library does.

Workers know of each other only through the lease table: a worker is alive while it holds a
lease that is not expired. Each aims at an even share, ceil(leases / live workers), and one that
holds fewer takes one lease per round from the busiest worker, but only from one holding more
than the share, so the counts settle instead of swapping back and forth.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection

from wildrydes_stream.consumer.lease import Lease


def fair_share(leases: Collection[Lease], me: str, expired: Callable[[Lease], bool]) -> int:
    """How many of `leases` (the unfinished, readable ones) each live worker should hold."""
    workers = {lease.owner for lease in leases if lease.owner and not expired(lease)} | {me}
    return math.ceil(len(leases) / len(workers))


def lease_to_steal(
    leases: Collection[Lease], me: str, expired: Callable[[Lease], bool]
) -> Lease | None:
    """A lease to take from the busiest other worker, or None when the spread is fair."""
    share = fair_share(leases, me, expired)
    live = [lease for lease in leases if lease.owner and not expired(lease)]
    if sum(1 for lease in live if lease.owner == me) >= share:
        return None
    counts = Counter(lease.owner for lease in live if lease.owner != me)
    if not counts:
        return None
    busiest, held = counts.most_common(1)[0]
    if held <= share:
        return None
    # The highest shard id: deterministic, so two thieves in one round tend to pick the same one
    # and only one of their conditional takes succeeds.
    return max((lease for lease in live if lease.owner == busiest), key=_shard_id)


def _shard_id(lease: Lease) -> str:
    return lease.shard_id
