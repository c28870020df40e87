"""The KPL aggregate format: what the KPL packs is split back exactly; what is corrupt is not
an aggregate, with a reason that says why."""

from __future__ import annotations

import hashlib

import pytest

from wildrydes_stream.records.kpl import (
    MAGIC,
    NotAnAggregate,
    UserRecord,
    aggregate,
    deaggregate,
    is_aggregate,
)
from wildrydes_stream.records.position import position, sequence_of, sub_of


def users(count: int) -> list[UserRecord]:
    return [
        UserRecord(f"unicorn-{i % 7}", str(i * 10**30) if i % 3 == 0 else None, f"{i}".encode())
        for i in range(count)
    ]


def test_an_aggregate_splits_into_its_user_records_in_order() -> None:
    packed = users(100)
    data = aggregate(packed)
    assert is_aggregate(data)
    assert deaggregate(data) == packed


def test_user_records_of_any_size_and_unicode_keys_survive() -> None:
    packed = [UserRecord("Épona ✨", None, b"\x00" * 70_000), UserRecord("a" * 256, None, b"")]
    assert deaggregate(aggregate(packed)) == packed


def test_a_wrong_md5_is_not_an_aggregate() -> None:
    data = bytearray(aggregate(users(3)))
    data[-1] ^= 0xFF
    with pytest.raises(NotAnAggregate, match="MD5 does not match"):
        deaggregate(bytes(data))


def test_a_broken_protobuf_with_a_right_md5_is_not_an_aggregate() -> None:
    body = aggregate(users(3))[len(MAGIC) : -16][:-3]  # the last record cut short
    with pytest.raises(NotAnAggregate, match="broken protobuf"):
        deaggregate(MAGIC + body + hashlib.md5(body).digest())


def test_a_record_pointing_past_the_key_table_is_broken() -> None:
    body = b"\x0a\x01k" + b"\x1a\x05\x08\x05\x1a\x01x"  # one key, a record naming key 5
    with pytest.raises(NotAnAggregate, match="broken protobuf"):
        deaggregate(MAGIC + body + hashlib.md5(body).digest())


def test_too_short_is_not_an_aggregate_and_plain_json_is_not_one_at_all() -> None:
    with pytest.raises(NotAnAggregate, match="too short"):
        deaggregate(MAGIC + b"\x00")
    assert not is_aggregate(b'{"Name": "Shadowfax"}')


def test_positions_order_as_kcl_orders_extended_sequence_numbers() -> None:
    big = 49590338271490256608559692538361571095921575989136588898
    ordered = [position(big, 0), position(big, 1), position(big, 99), position(big + 1, 0)]
    assert ordered == sorted(ordered)
    assert (sequence_of(ordered[2]), sub_of(ordered[2])) == (big, 99)
