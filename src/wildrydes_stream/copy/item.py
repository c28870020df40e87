"""Kinesis record -> DynamoDB item: decode, validate, convert `StatusTime`.

Items are built directly in DynamoDB's wire format (`{"N": "1317"}`) so numbers keep the exact
text they had in the record: no float ever touches them.
"""

from __future__ import annotations

import functools
from decimal import Decimal
from typing import Any, Final

import orjson

from wildrydes_stream.config import StatusTimeFormat
from wildrydes_stream.errors import RecordError
from wildrydes_stream.records.envelope import AttributeValue, Item, ItemKey
from wildrydes_stream.records.fields import decode_body, status_time_to_epoch_ms

# The per-minute aggregate's measurements: when present they must be numbers.
METRIC_FIELDS: Final = (
    "Distance",
    "MinMagicPoints",
    "MaxMagicPoints",
    "MinHealthPoints",
    "MaxHealthPoints",
)


def decode_item(data: bytes, status_time_format: StatusTimeFormat) -> tuple[ItemKey, Item]:
    """The table item for one record's data, or RecordError saying what is wrong with it.

    Nothing else escapes: a record that breaks the decoder itself (RecursionError from ~1,000
    nested arrays, a number too long for int()) is that record's fault, and must be
    dead-lettered rather than stop the shard, or every restart would stop on it again.
    """
    try:
        decoded = _decode_plain_item(data, status_time_format) or _decode_item(
            data, status_time_format
        )
        # An item is never larger than the flat JSON object it comes from (escapes, numbers,
        # true and null only shrink), so only records past the limit need measuring.
        if len(data) > MAX_ITEM_BYTES:
            _check_item_size(decoded[1])
        return decoded
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(f"cannot be decoded: {type(exc).__name__}: {exc}"[:500]) from None


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


MAX_ITEM_BYTES: Final = 400 * 1024
"""DynamoDB's item size limit: attribute names and values together."""


def item_size(item: Item) -> int:
    """An item's size as DynamoDB counts it against MAX_ITEM_BYTES: each attribute's name and
    value in UTF-8, a number by its significant digits, a boolean or null one byte."""
    size = 0
    for name, attribute in item.items():
        size += len(name.encode())
        for kind, value in attribute.items():
            if kind == "S":
                size += len(value.encode())
            elif kind == "N":
                size += _number_size(value)
            else:
                size += 1
    return size


def _number_size(text: str) -> int:
    """Bytes of a number in DynamoDB's format: two significant digits a byte, one more for the
    exponent, one for a minus sign, one when an even count of digits starts at an even
    exponent."""
    number = Decimal(text)
    if number == 0:
        return 1
    digits = len("".join(map(str, number.as_tuple().digits)).strip("0"))
    size = 1 + (digits + 1) // 2 + (1 if number < 0 else 0)
    if digits % 2 == 0 and number.adjusted() % 2 == 0:
        size += 1
    return size


def _check_item_size(item: Item) -> None:
    size = item_size(item)
    if size > MAX_ITEM_BYTES:
        raise RecordError(
            f"item is {size:,} bytes, over DynamoDB's item limit of 400 KB "
            f"({MAX_ITEM_BYTES:,} bytes): the table cannot take it"
        )


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
