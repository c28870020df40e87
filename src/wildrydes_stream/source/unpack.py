"""A page of Kinesis records as the user records the application handles, with their positions.

A KPL aggregate (records/kpl.py) gives one user record per sub-record, at positions (sequence,
index); any other record is one user record at (sequence, 0). An aggregate that fails its MD5
or protobuf check is passed on whole with the reason, to be dead-lettered as it is.

After a restart at a checkpoint, reading starts AT the checkpoint's sequence number (as KCL
does) and the user records at or before the checkpoint's position are skipped: a restart inside
an aggregate resumes after its last finished sub-record.

A sub-record whose hash key (its explicit hash key, else the MD5 of its partition key) lies
outside the shard's range was packed by a producer with an outdated shard map. KCL drops it,
counting on the producer to send it again; this service keeps its promise that nothing read is
lost, so such a record is handled here like the others (writes are idempotent) and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wildrydes_stream.records.kpl import NotAnAggregate, UserRecord, deaggregate, is_aggregate
from wildrydes_stream.records.position import SUB_BITS
from wildrydes_stream.records.routing import hash_key


@dataclass(slots=True)
class UserRecords:
    """A page's user records in order, as parallel lists (the hot path of plain records
    builds no object per record)."""

    positions: list[int] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)
    source: list[int] = field(default_factory=list)
    """Index of the Kinesis record each came from (for its arrival time)."""
    refused: dict[int, str] = field(default_factory=dict)
    """Index in the lists above -> why a record with the KPL magic is not an aggregate."""
    aggregates: int = 0
    outside_shard: int = 0


def unpack(
    records: list[dict[str, Any]],
    hash_range: tuple[int, int] | None,
    skip_through: int | None,
) -> UserRecords:
    out = UserRecords()
    if skip_through is None and not any(is_aggregate(r["Data"]) for r in records):
        out.positions = [int(r["SequenceNumber"]) << SUB_BITS for r in records]
        out.data = [r["Data"] for r in records]
        out.source = list(range(len(records)))
        return out
    for index, record in enumerate(records):
        data: bytes = record["Data"]
        base = int(record["SequenceNumber"]) << SUB_BITS
        if not is_aggregate(data):
            _add(out, base, data, index, skip_through)
            continue
        try:
            subs = deaggregate(data)
        except NotAnAggregate as exc:
            if _add(out, base, data, index, skip_through):
                out.refused[len(out.data) - 1] = str(exc)
            continue
        out.aggregates += 1
        for sub, user in enumerate(subs):
            if hash_range is not None and not _inside(hash_range, user):
                out.outside_shard += 1
            _add(out, base | sub, user.data, index, skip_through)
    return out


def _add(out: UserRecords, at: int, data: bytes, index: int, skip_through: int | None) -> bool:
    if skip_through is not None and at <= skip_through:
        return False
    out.positions.append(at)
    out.data.append(data)
    out.source.append(index)
    return True


def _inside(hash_range: tuple[int, int], user: UserRecord) -> bool:
    explicit = user.explicit_hash_key
    key = int(explicit) if explicit is not None else hash_key(user.partition_key)
    return hash_range[0] <= key <= hash_range[1]
