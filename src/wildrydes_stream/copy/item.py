"""Kinesis record -> DynamoDB item: decode, validate, convert `StatusTime`.

Items are built directly in DynamoDB's wire format (`{"N": "1317"}`) so numbers keep the exact
text they had in the record: no float ever touches them.
"""

from __future__ import annotations

import calendar
import functools
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Protocol

import orjson

from wildrydes_stream.config import StatusTimeFormat
from wildrydes_stream.errors import RecordError

AttributeValue = dict[str, Any]
Item = dict[str, AttributeValue]
ItemKey = tuple[str, str]

# The per-minute aggregate's measurements: when present they must be numbers.
METRIC_FIELDS: Final = (
    "Distance",
    "MinMagicPoints",
    "MaxMagicPoints",
    "MinHealthPoints",
    "MaxHealthPoints",
)

_STATUS_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?Z?")


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


# One decoder for every record: json.loads with parse_float would build a new one each call.
_JSON: Final = json.JSONDecoder(parse_float=Decimal)


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


def decode_item(data: bytes, status_time_format: StatusTimeFormat) -> tuple[ItemKey, Item]:
    """The table item for one record's data, or RecordError saying what is wrong with it.

    Nothing else escapes: a record that breaks the decoder itself (RecursionError from ~1,000
    nested arrays, a number too long for int()) is that record's fault, and must be
    dead-lettered rather than stop the shard, or every restart would stop on it again.
    """
    try:
        fast = _decode_plain_item(data, status_time_format)
        if fast is not None:
            return fast
        return _decode_item(data, status_time_format)
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(f"cannot be decoded: {type(exc).__name__}: {exc}"[:500]) from None


def decode_body(data: bytes) -> tuple[dict[str, Any], str, str]:
    """A record's JSON object (floats as Decimal, exactly), with its Name and StatusTime
    checked to be there as strings; RecordError saying what is wrong otherwise."""
    try:
        body = _JSON.decode(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RecordError(f"not JSON (not UTF-8): {exc}") from None
    except ValueError as exc:
        raise RecordError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RecordError(f"expected a JSON object, got {type(body).__name__}")
    name = body.get("Name")
    if not isinstance(name, str) or not name:
        raise RecordError("Name is missing or not a non-empty string")
    status_time = body.get("StatusTime")
    if not isinstance(status_time, str):
        raise RecordError("StatusTime is missing or not a string")
    return body, name, status_time


def _decode_item(data: bytes, status_time_format: StatusTimeFormat) -> tuple[ItemKey, Item]:
    body, name, status_time = decode_body(data)
    epoch_ms = _epoch_ms_cached(status_time)
    item: Item = {"Name": {"S": name}}
    if status_time_format == "epoch_ms":
        sort_key = str(epoch_ms)
        item["StatusTime"] = {"N": sort_key}
    else:
        sort_key = status_time
        item["StatusTime"] = {"S": status_time}
    for field, value in body.items():
        if field in ("Name", "StatusTime"):
            continue
        item[field] = _attribute(field, value)
    return (name, sort_key), item


def _decode_plain_item(
    data: bytes, status_time_format: StatusTimeFormat
) -> tuple[ItemKey, Item] | None:
    """The item of a record that holds only strings and integers (every aggregate does), with
    orjson, several times faster than the exact path; None for anything else, which the exact
    path then decodes (or refuses) exactly as before.

    Only those two types are taken here because only they keep their exact text through
    orjson: an integer orjson returns as `int` prints back to the digits it was read from
    (larger ones come back as float and go to the exact path, as every float does). What
    orjson refuses (NaN, lone surrogates, a BOM, bad UTF-8) is left to the exact path too, so
    what is accepted stays the same (tests/copy/test_fast_paths.py compares both paths).
    """
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if type(body) is not dict:
        return None
    name = body.get("Name")
    status_time = body.get("StatusTime")
    if type(name) is not str or not name or type(status_time) is not str:
        return None
    epoch_ms = _epoch_ms_cached(status_time)  # validates it in either format
    # Name and StatusTime first, as the exact path orders them; the loop writes their
    # string attributes in place, and a numeric sort key replaces StatusTime's after it.
    item: Item = {"Name": _UNSET, "StatusTime": _UNSET}
    shared = _SHARED_ATTRIBUTES
    for field, value in body.items():
        kind = type(value)
        if kind is str:
            if field in METRIC_FIELDS:
                return None
        elif kind is not int:
            return None
        attribute = shared.get(value)
        if attribute is None:
            if kind is int:
                attribute = {"N": str(value)}
            else:
                attribute = {"S": value}
                if len(value) > _MAX_SHARED_STRING:
                    item[field] = attribute
                    continue  # free text is not kept: it would fill the table with one-offs
            if len(shared) < _MAX_SHARED_ATTRIBUTES:
                shared[value] = attribute
        item[field] = attribute
    if status_time_format == "epoch_ms":
        sort_key = str(epoch_ms)
        item["StatusTime"] = {"N": sort_key}
    else:
        sort_key = status_time
    return (name, sort_key), item


# Attribute values recur (the same names, magic points from 0 to 200, the same minutes): one
# read-only `{"N": "146"}` per value serves every item that holds it, instead of a new dict
# per field of every record. Keyed by the value itself, which is only ever an int or a str
# here (never a bool, which would equal 1), and bounded in count and in the length of the
# strings it keeps (names, not free text): at most about 2 MB. Past the bound, values get
# their own.
_SHARED_ATTRIBUTES: Final[dict[int | str, AttributeValue]] = {}
_MAX_SHARED_STRING: Final = 40
_UNSET: Final[AttributeValue] = {}
_MAX_SHARED_ATTRIBUTES: Final = 16_384


# Every unicorn reports the same minutes, so the same few StatusTime strings recur: caching
# their conversion saves most of it. Invalid ones raise and are not cached.
@functools.lru_cache(maxsize=4096)
def _epoch_ms_cached(text: str) -> int:
    return status_time_to_epoch_ms(text)


def status_time_to_epoch_ms(text: str) -> int:
    """`2016-02-12 00:01:00.000` (UTC, no zone) -> epoch milliseconds."""
    match = _STATUS_TIME.fullmatch(text)
    if match is None:
        raise RecordError(f"StatusTime {text!r} is not YYYY-MM-DD HH:MM:SS.mmm")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    fraction = match.group(7) or "0"
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
        _check_ranges(year, month, day, hour, minute, second)
    except ValueError:
        raise RecordError(f"StatusTime {text!r} is not a valid time") from None
    return seconds * 1000 + int(fraction.ljust(3, "0")[:3])


def _check_ranges(year: int, month: int, day: int, hour: int, minute: int, second: int) -> None:
    if not 1 <= month <= 12:
        raise ValueError
    # calendar.timegm does not check the day: 2016-02-30 would silently become 2016-03-01.
    last_day = calendar.monthrange(year, month)[1]
    # Second 60 (a leap second) is refused: in epoch_ms it would land on the next minute's key
    # and overwrite that record.
    if not (1 <= day <= last_day and hour < 24 and minute < 60 and second < 60):
        raise ValueError


def _attribute(field: str, value: Any) -> AttributeValue:
    if type(value) is int:  # the common case, checked first (bool is not int by `type`)
        text = str(value)
        if len(text) > _MAX_NUMBER_DIGITS:
            _check_precision(field, value)
        return {"N": text}
    if isinstance(value, bool):
        if field in METRIC_FIELDS:
            raise RecordError(f"{field} is not a number")
        return {"BOOL": value}
    if isinstance(value, int | Decimal):
        if isinstance(value, Decimal) and not value.is_finite():
            raise RecordError(f"{field} is not a finite number")
        _check_precision(field, value)
        return {"N": str(value)}
    if field in METRIC_FIELDS:
        raise RecordError(f"{field} is not a number")
    if isinstance(value, str):
        return {"S": value}
    if value is None:
        return {"NULL": True}
    raise RecordError(f"{field} holds a nested value the table does not take")


# DynamoDB numbers: up to 38 significant digits, magnitude 1E-130 to 9.9999...E+125. A number
# outside that is refused by the table; finding it here names the field.
_MAX_NUMBER_DIGITS: Final = 38


def _check_precision(field: str, value: int | Decimal) -> None:
    number = Decimal(value)
    if number == 0:
        return
    # Not normalize(): it rounds to the context's 28 digits, hiding exactly what is checked.
    digits = len("".join(map(str, number.as_tuple().digits)).strip("0"))
    exponent = number.adjusted()
    if digits > _MAX_NUMBER_DIGITS or not -130 <= exponent <= 125:
        raise RecordError(
            f"{field} does not fit a DynamoDB number (38 significant digits, 1E-130 to 1E+126)"
        )


def item_key_of(item: Item) -> ItemKey:
    """The (Name, StatusTime) key of an item in wire format."""
    status = item["StatusTime"]
    return item["Name"]["S"], status.get("N") or status["S"]
