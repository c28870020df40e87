"""Record -> item: real workshop data, both StatusTime formats, exact numbers, clear rejections."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.helpers import read_shadowfax
from wildrydes_stream.config import StatusTimeFormat
from wildrydes_stream.copy.item import METRIC_FIELDS, decode_item
from wildrydes_stream.errors import RecordError
from wildrydes_stream.records.envelope import item_key_of
from wildrydes_stream.records.fields import status_time_to_epoch_ms

FIRST = (
    b'{"Name":"Shadowfax","StatusTime":"2016-02-12 00:00:00.000","Distance":1317,'
    b'"MinMagicPoints":146,"MaxMagicPoints":149,"MinHealthPoints":144,"MaxHealthPoints":149}'
)


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def _expected_epoch_ms(status_time: str) -> int:
    """Independent of the code under test: strptime, read as UTC."""
    moment = datetime.strptime(status_time, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def _record(**changes: Any) -> bytes:
    body: dict[str, Any] = {
        "Name": "Shadowfax",
        "StatusTime": "2016-02-12 00:00:00.000",
        "Distance": 1317,
        "MinMagicPoints": 146,
        "MaxMagicPoints": 149,
        "MinHealthPoints": 144,
        "MaxHealthPoints": 149,
    }
    for key, value in changes.items():
        if value is _DROP:
            del body[key]
        else:
            body[key] = value
    return _encode(body)


_DROP = object()


@pytest.mark.usefixtures("shadowfax_available")
def test_every_workshop_record_decodes_to_an_epoch_ms_item_with_every_field_as_a_number() -> None:
    records = read_shadowfax()
    assert len(records) == 1440
    keys = set()
    for record in records:
        key, item = decode_item(_encode(record), "epoch_ms")
        epoch_ms = _expected_epoch_ms(record["StatusTime"])
        assert key == ("Shadowfax", str(epoch_ms))
        assert item_key_of(item) == key
        assert item["Name"] == {"S": "Shadowfax"}
        assert item["StatusTime"] == {"N": str(epoch_ms)}
        assert set(item) == set(record)
        for field in METRIC_FIELDS:
            assert item[field] == {"N": str(record[field])}
        keys.add(key)
    # One item per minute of the day: no two records collapse onto one key.
    assert len(keys) == 1440
    first_ms = _expected_epoch_ms(records[0]["StatusTime"])
    assert sorted(int(k[1]) for k in keys) == [first_ms + 60_000 * i for i in range(1440)]


@pytest.mark.usefixtures("shadowfax_available")
def test_every_workshop_record_decodes_with_string_status_time_kept_as_read() -> None:
    for record in read_shadowfax():
        key, item = decode_item(_encode(record), "string")
        assert key == ("Shadowfax", record["StatusTime"])
        assert item["StatusTime"] == {"S": record["StatusTime"]}
        assert item_key_of(item) == key


def test_first_record_of_the_day_matches_the_original_lambda_item() -> None:
    key, item = decode_item(FIRST, "epoch_ms")
    assert key == ("Shadowfax", "1455235200000")
    assert item == {
        "Name": {"S": "Shadowfax"},
        "StatusTime": {"N": "1455235200000"},
        "Distance": {"N": "1317"},
        "MinMagicPoints": {"N": "146"},
        "MaxMagicPoints": {"N": "149"},
        "MinHealthPoints": {"N": "144"},
        "MaxHealthPoints": {"N": "149"},
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2016-02-12 00:00:00.000", 1455235200000),
        ("2016-02-12 00:01:00.000", 1455235260000),
        ("2016-02-12 23:59:00.000", 1455321540000),
        ("2016-02-12 00:00:00.5", 1455235200500),
        ("2016-02-12 00:00:00", 1455235200000),
        ("2016-02-29 12:00:00.000", 1456747200000),  # a leap day
        ("1970-01-01 00:00:00.001", 1),
    ],
)
def test_status_time_to_epoch_ms_reads_utc(text: str, expected: int) -> None:
    assert status_time_to_epoch_ms(text) == expected


def test_float_distance_keeps_its_exact_text() -> None:
    # 0.1 and 1317.25 have no exact binary float; a float round trip would print other digits
    # for some of these (and 1317.50 would lose its trailing zero).
    for text in ("1317.25", "0.1", "1317.50", "0.30000000000000004", "123456789.123456789"):
        data = FIRST.replace(b'"Distance":1317', b'"Distance":' + text.encode())
        _, item = decode_item(data, "epoch_ms")
        assert item["Distance"] == {"N": text}


def test_large_integers_stay_exact() -> None:
    big = 2**100 + 1  # far beyond float's 53-bit mantissa
    _, item = decode_item(_record(Distance=big, MaxHealthPoints=9007199254740993), "epoch_ms")
    assert item["Distance"] == {"N": str(big)}
    assert item["MaxHealthPoints"] == {"N": "9007199254740993"}


def test_other_fields_are_copied_with_their_types() -> None:
    _, item = decode_item(_record(Colour="white", Flying=True, Rider=None), "epoch_ms")
    assert item["Colour"] == {"S": "white"}
    assert item["Flying"] == {"BOOL": True}
    assert item["Rider"] == {"NULL": True}


def test_metric_fields_are_optional() -> None:
    data = _encode({"Name": "Shadowfax", "StatusTime": "2016-02-12 00:00:00.000"})
    _, item = decode_item(data, "epoch_ms")
    assert item == {"Name": {"S": "Shadowfax"}, "StatusTime": {"N": "1455235200000"}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json at all", "not JSON"),
        (b'{"Name":"Shadowfax",', "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"", "not JSON"),
        (b'["Shadowfax","2016-02-12 00:00:00.000"]', "expected a JSON object, got list"),
        (b"42", "expected a JSON object, got int"),
        (_record(Name=_DROP), "Name is missing"),
        (_record(Name=""), "Name is missing or not a non-empty string"),
        (_record(Name=7), "Name is missing or not a non-empty string"),
        (_record(StatusTime=_DROP), "StatusTime is missing"),
        (_record(StatusTime=1455235200000), "StatusTime is missing or not a string"),
        (_record(StatusTime="yesterday"), "StatusTime 'yesterday' is not YYYY-MM-DD HH:MM:SS.mmm"),
        (_record(StatusTime="2016-02-12"), "is not YYYY-MM-DD HH:MM:SS.mmm"),
        (_record(StatusTime="2016-13-01 00:00:00.000"), "is not a valid time"),
        (_record(StatusTime="2016-02-12 24:00:00.000"), "is not a valid time"),
        (_record(StatusTime="2016-02-12 00:60:00.000"), "is not a valid time"),
        (_record(StatusTime="2016-02-12 00:00:60.000"), "is not a valid time"),
        (_record(StatusTime="2016-02-00 00:00:00.000"), "is not a valid time"),
        # Days past the end of the month must not roll over into the next month's keys.
        (_record(StatusTime="2016-02-30 00:00:00.000"), "is not a valid time"),
        (_record(StatusTime="2015-02-29 00:00:00.000"), "is not a valid time"),
        (_record(StatusTime="2016-04-31 00:00:00.000"), "is not a valid time"),
        (_record(Distance="1317"), "Distance is not a number"),
        (_record(Distance=True), "Distance is not a number"),
        (_record(Distance=None), "Distance is not a number"),
        (_record(MinMagicPoints=[1, 2]), "MinMagicPoints is not a number"),
        (_record(MaxHealthPoints={"value": 1}), "MaxHealthPoints is not a number"),
        (FIRST.replace(b'"Distance":1317', b'"Distance":NaN'), "Distance is not a number"),
        (FIRST.replace(b'"Distance":1317', b'"Distance":Infinity'), "Distance is not a number"),
        (_record(Extra={"nested": 1}), "Extra holds a nested value"),
    ],
)
def test_invalid_records_raise_record_error_saying_what_is_wrong(data: bytes, message: str) -> None:
    formats: tuple[StatusTimeFormat, ...] = ("epoch_ms", "string")
    for status_time_format in formats:
        with pytest.raises(RecordError) as caught:
            decode_item(data, status_time_format)
        text = str(caught.value)
        assert message in text
        assert "\n" not in text  # one line, fit for a log field and the dead-letter entry


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"[" * 1000 + b"]" * 1000, "RecursionError"),
        (b'{"a":' * 2000, "RecursionError"),
        (_record(Distance=_DROP)[:-1] + b',"Distance":' + b"9" * 5000 + b"}", "digits"),
        (_record(Distance=10**40 - 1), "Distance does not fit a DynamoDB number"),
        (_record(Distance=json.loads("1e300")), "Distance does not fit a DynamoDB number"),
    ],
    ids=["nested-arrays", "nested-objects", "5000-digit-number", "40-digits", "1e300"],
)
def test_records_that_break_the_decoder_are_refused_as_records(data: bytes, reason: str) -> None:
    # Anything but RecordError would escape the poller and stop the service on every restart.
    with pytest.raises(RecordError, match=reason):
        decode_item(data, "epoch_ms")


def test_numbers_dynamodb_takes_keep_their_exact_text() -> None:
    _, item = decode_item(_record(Distance=10**37, MinMagicPoints=-(10**37)), "epoch_ms")
    assert item["Distance"] == {"N": str(10**37)}
    assert item["MinMagicPoints"] == {"N": str(-(10**37))}
