"""Which shard Kinesis routes a record to: the one whose hash key range holds the MD5 of the
record's partition key (or its explicit hash key)."""

from __future__ import annotations

import hashlib


def hash_key(partition_key: str) -> int:
    """Where Kinesis puts a record with this partition key: the MD5 of its UTF-8 bytes as a
    128-bit big-endian integer, within some shard's [starting, ending] hash key range."""
    return int.from_bytes(hashlib.md5(partition_key.encode("utf-8")).digest(), "big")
