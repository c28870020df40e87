"""What travels through the pipeline with a record: its key, its payload, the tenure of the
lease it was read under (where it is acknowledged), and the dead letter it becomes when it
cannot be written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

AttributeValue = dict[str, Any]
Item = dict[str, AttributeValue]
ItemKey = tuple[str, str]


class Tenure(Protocol):
    """One holding of a shard's lease: where a finished record is acknowledged.

    Each take of a lease starts a new tenure. When the lease is lost the tenure is fenced:
    its records still queued are dropped unwritten (the new owner writes them) and late
    acknowledgements land on the old tenure, never on a later checkpoint.
    """

    @property
    def fenced(self) -> bool: ...
    def finish(self, sequence: int) -> None: ...


@dataclass(slots=True)
class Envelope:
    """One record on its way through the pipeline, with what is needed to checkpoint it."""

    shard_id: str
    sequence: int
    key: ItemKey
    item: Item
    arrival: float  # ApproximateArrivalTimestamp, epoch seconds
    data: bytes  # the raw record, kept for the dead-letter destination
    tenure: Tenure  # the lease tenure the record was read under; acks go there


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that cannot be written: its raw data, why, and where it was read."""

    data: bytes
    reason: str
    kind: str  # bounded label for metrics: "invalid_record", "rejected_by_table", "retries"
    stream: str
    shard_id: str
    sequence: int
    arrival: float


def item_key_of(item: Item) -> ItemKey:
    """The (Name, StatusTime) key of an item in wire format."""
    status = item["StatusTime"]
    return item["Name"]["S"], status.get("N") or status["S"]
