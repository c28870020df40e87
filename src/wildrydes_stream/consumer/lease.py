"""A lease item in the layout of the Kinesis Client Library's lease table, and its reading.

One item per shard: `leaseKey` (shard id), `leaseOwner`, `leaseCounter`, `checkpoint` (a
sequence number or a sentinel), `checkpointSubSequenceNumber`, `ownerSwitchesSinceCheckpoint`
and `parentShardId` (string set); KCL 2/3 add `childShardIds` and `checkpointOwner`.

Attributes KCL does not have: `startingTimestamp` (N, epoch ms), the moment a lease whose
`checkpoint` is still `LATEST` or `AT_TIMESTAMP` starts at (the sentinel stays, KCL reads it;
the moment lets the next owner read from where the first one started instead of asking for a
new LATEST, which would skip whatever arrived while the lease moved), and `wildrydesStateRef`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Final

from wildrydes_stream.records.position import position

SHARD_END: Final = "SHARD_END"
TRIM_HORIZON: Final = "TRIM_HORIZON"
LATEST: Final = "LATEST"
AT_TIMESTAMP: Final = "AT_TIMESTAMP"
MOMENT_SENTINELS: Final = frozenset({LATEST, AT_TIMESTAMP})
"""Checkpoints that name a moment rather than a record: the lease keeps `startingTimestamp`."""


@dataclass(slots=True)
class Lease:
    shard_id: str
    checkpoint: str
    owner: str | None
    counter: int
    parents: tuple[str, ...] = ()
    owner_switches: int = 0
    starting_ms: int | None = None
    """`startingTimestamp`: where a LATEST or AT_TIMESTAMP checkpoint starts (epoch ms)."""
    starting_inherited: bool = False
    """`starting_ms` was recorded by an earlier tenure (not by this take or create)."""
    checkpoint_owner: str | None = None
    """`checkpointOwner` (KCL 3): the previous owner still finishing a hand-off to `owner`;
    nobody else reads the shard until it has checkpointed and cleared it."""
    children: tuple[str, ...] = ()
    """`childShardIds`, once the shard is finished and its children are known."""
    subsequence: int = 0
    """`checkpointSubSequenceNumber`: the index of the last finished user record of the KPL
    aggregate at `checkpoint` (0 for a plain record)."""
    state_ref: str | None = None
    """`wildrydesStateRef`: where the application's state of the shard as of `checkpoint`
    is in the state table (consumer/statestore.py), written with it in one conditional
    update."""
    confirmed_at: float = field(default=0.0, compare=False)
    """Monotonic time at which the last write that proved we hold the lease was sent."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, compare=False, repr=False)
    """One write at a time per tenure: checkpoint, renewal and release all move the counter
    they are conditional on, so two in flight would make the second look like a loss."""

    @property
    def at_shard_end(self) -> bool:
        return self.checkpoint == SHARD_END

    @property
    def position(self) -> int | None:
        """The checkpoint as a position (records/position.py); None at a sentinel."""
        if not self.checkpoint.isdigit():
            return None
        return position(int(self.checkpoint), self.subsequence)

    @property
    def at_moment(self) -> bool:
        """No record read yet under a LATEST or AT_TIMESTAMP start."""
        return self.checkpoint in MOMENT_SENTINELS


# What the scan and reads ask for: the lease's own attributes (KCL's and this service's), never
# whatever else an item of the table may carry (the state lives in the state table).
_LEASE_ATTRIBUTES: Final = (
    "leaseKey",
    "leaseOwner",
    "leaseCounter",
    "checkpoint",
    "checkpointSubSequenceNumber",
    "ownerSwitchesSinceCheckpoint",
    "parentShardId",
    "startingTimestamp",
    "childShardIds",
    "checkpointOwner",
    "wildrydesStateRef",
    "entityType",
)
LEASE_PROJECTION: Final[dict[str, Any]] = {
    "ProjectionExpression": ", ".join(f"#a{i}" for i in range(len(_LEASE_ATTRIBUTES))),
    "ExpressionAttributeNames": {f"#a{i}": name for i, name in enumerate(_LEASE_ATTRIBUTES)},
}


def is_shard_lease(item: dict[str, Any]) -> bool:
    """A single-stream lease (its key a shard id), not another item a KCL application keeps."""
    key = item.get("leaseKey", {}).get("S", "")
    return bool(key) and ":" not in key and "entityType" not in item


def lease_from_item(item: dict[str, Any]) -> Lease:
    starting = item.get("startingTimestamp", {}).get("N")
    return Lease(
        shard_id=item["leaseKey"]["S"],
        checkpoint=item.get("checkpoint", {}).get("S", TRIM_HORIZON),
        owner=item.get("leaseOwner", {}).get("S"),
        counter=int(item.get("leaseCounter", {}).get("N", "0")),
        parents=tuple(sorted(item.get("parentShardId", {}).get("SS", []))),
        owner_switches=int(item.get("ownerSwitchesSinceCheckpoint", {}).get("N", "0")),
        starting_ms=int(starting) if starting is not None else None,
        subsequence=int(item.get("checkpointSubSequenceNumber", {}).get("N", "0")),
        children=tuple(sorted(item.get("childShardIds", {}).get("SS", []))),
        checkpoint_owner=item.get("checkpointOwner", {}).get("S"),
        state_ref=item.get("wildrydesStateRef", {}).get("S"),
    )
