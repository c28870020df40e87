"""A record's position in its shard: the Kinesis sequence number and, for a user record packed in
a KPL aggregate, its index there (KCL's "extended sequence number").

Positions are ints that order as KCL orders extended sequence numbers: (sequence, sub-record)
compared in turn. A plain record is sub-record 0 of its sequence number. The shard's progress,
the acknowledgements and the application state all count in positions; the lease stores one as
`checkpoint` (the sequence number) and `checkpointSubSequenceNumber` (the index), as KCL does.
"""

from __future__ import annotations

from typing import Final

SUB_BITS: Final = 24
"""Room for 16.7 million sub-records an aggregate: a 10 MiB record of the smallest possible
sub-records (a few bytes each) stays below."""
_SUB_MASK: Final = (1 << SUB_BITS) - 1


def position(sequence: int, sub: int = 0) -> int:
    return (sequence << SUB_BITS) | sub


def sequence_of(at: int) -> int:
    return at >> SUB_BITS


def sub_of(at: int) -> int:
    return at & _SUB_MASK
