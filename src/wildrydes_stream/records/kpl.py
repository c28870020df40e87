"""The Kinesis Producer Library's aggregated record: many user records in one Kinesis record.

Layout: the magic bytes `F3 89 9A C2`, a protobuf `AggregatedRecord`, then the MD5 of the
protobuf bytes. The message (from the KPL's `messages.proto`):

    message AggregatedRecord {
      repeated string partition_key_table = 1;
      repeated string explicit_hash_key_table = 2;
      repeated Record records = 3;
    }
    message Record {
      required uint64 partition_key_index = 1;
      optional uint64 explicit_hash_key_index = 2;
      required bytes data = 3;
      repeated Tag tags = 4;    // Tag { required string key = 1; optional string value = 2; }
    }

Decoded by a few lines here rather than with the protobuf package: three messages of varints
and length-delimited fields need no generated code and no dependency; what it costs a user
record is in `make bench` (KPL aggregates beside plain records). A record with the magic whose
MD5 does not match, or whose protobuf is broken, is not an aggregate (as KCL decides): the
caller handles it as a plain record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

MAGIC: Final = b"\xf3\x89\x9a\xc2"
_DIGEST: Final = 16


@dataclass(frozen=True, slots=True)
class UserRecord:
    partition_key: str
    explicit_hash_key: str | None
    data: bytes


class NotAnAggregate(ValueError):
    """The record starts with the magic but is no valid aggregate (the reason says why)."""


def is_aggregate(data: bytes) -> bool:
    """Starts with the magic: an aggregate, or a corrupt one."""
    return data[:4] == MAGIC


def deaggregate(data: bytes) -> list[UserRecord]:
    """The user records of an aggregate, in order; NotAnAggregate when it is not a valid one."""
    if len(data) < len(MAGIC) + _DIGEST:
        raise NotAnAggregate("KPL aggregate too short for its MD5")
    body = memoryview(data)[len(MAGIC) : len(data) - _DIGEST]
    if hashlib.md5(body).digest() != data[-_DIGEST:]:
        raise NotAnAggregate("KPL aggregate whose MD5 does not match its content")
    try:
        keys, hash_keys, records = _aggregated_record(body)
        return [
            UserRecord(
                keys[key_index],
                hash_keys[hash_index] if hash_index is not None else None,
                payload,
            )
            for key_index, hash_index, payload in records
        ]
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise NotAnAggregate(f"KPL aggregate with a broken protobuf ({exc})") from None


_Record = tuple[int, int | None, bytes]


def _aggregated_record(body: memoryview) -> tuple[list[str], list[str], list[_Record]]:
    keys: list[str] = []
    hash_keys: list[str] = []
    records: list[_Record] = []
    for field, value in _fields(body):
        if field == 1:
            keys.append(_bytes(value).decode("utf-8"))
        elif field == 2:
            hash_keys.append(_bytes(value).decode("utf-8"))
        elif field == 3:
            records.append(_record(_view(value)))
    return keys, hash_keys, records


def _record(body: memoryview) -> _Record:
    key_index: int | None = None
    hash_index: int | None = None
    payload: bytes | None = None
    for field, value in _fields(body):
        if field == 1:
            key_index = _int(value)
        elif field == 2:
            hash_index = _int(value)
        elif field == 3:
            payload = _bytes(value)
    if key_index is None or payload is None:
        raise ValueError("a record without its partition key index or data")
    return key_index, hash_index, payload


def _fields(body: memoryview) -> list[tuple[int, int | memoryview]]:
    """(field number, varint value or length-delimited bytes); fixed-width fields skipped."""
    fields: list[tuple[int, int | memoryview]] = []
    at, end = 0, len(body)
    while at < end:
        key, at = _varint(body, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(body, at)
            fields.append((field, value))
        elif wire == 2:
            length, at = _varint(body, at)
            if at + length > end:
                raise ValueError("a field runs past the end")
            fields.append((field, body[at : at + length]))
            at += length
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        else:
            raise ValueError(f"wire type {wire}")
    if at != end:
        raise ValueError("a field runs past the end")
    return fields


def _varint(body: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = body[at]  # IndexError past the end: broken
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _int(value: int | memoryview) -> int:
    if not isinstance(value, int):
        raise ValueError("a length-delimited field where a number belongs")
    return value


def _view(value: int | memoryview) -> memoryview:
    if isinstance(value, int):
        raise ValueError("a number where a message belongs")
    return value


def _bytes(value: int | memoryview) -> bytes:
    return bytes(_view(value))


def aggregate(records: Sequence[UserRecord]) -> bytes:
    """One Kinesis record holding `records`, as the KPL packs them (for `produce --kpl` and
    tests)."""
    keys: dict[str, int] = {}
    hash_keys: dict[str, int] = {}
    body = bytearray()
    for record in records:
        inner = bytearray()
        inner += _key(1, 0) + _encode_varint(keys.setdefault(record.partition_key, len(keys)))
        if record.explicit_hash_key is not None:
            index = hash_keys.setdefault(record.explicit_hash_key, len(hash_keys))
            inner += _key(2, 0) + _encode_varint(index)
        inner += _delimited(3, record.data)
        body += _delimited(3, bytes(inner))
    head = bytearray()
    for key in keys:
        head += _delimited(1, key.encode("utf-8"))
    for hash_key in hash_keys:
        head += _delimited(2, hash_key.encode("utf-8"))
    message = bytes(head + body)
    return MAGIC + message + hashlib.md5(message).digest()


def _key(field: int, wire: int) -> bytes:
    return _encode_varint(field << 3 | wire)


def _delimited(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _encode_varint(len(value)) + value


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
