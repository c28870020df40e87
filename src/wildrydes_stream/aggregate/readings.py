"""A raw sensor reading: decode and validate one record of the `wildrydes` stream.

Numbers are exact: integers stay `int`, and a number with a fraction or an exponent is kept
as Decimal (the JSON text, exactly): Distance may be a float in the readings, and its
per-minute sum must not pick up binary rounding. Their magnitude is bounded so that an exact
sum stays cheap (a reading of 1e999999 metres is that record's fault, not the window's).

Two decoders give the same answers: orjson for readings whose three measurements are integers
(every reading the workshop producer sends), and the exact decoder for everything else,
which also words every refusal.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final, NamedTuple

import orjson

from wildrydes_stream.errors import RecordError
from wildrydes_stream.records.envelope import ItemKey
from wildrydes_stream.records.fields import decode_body, status_time_to_epoch_ms

Number = int | Decimal
"""A measurement: exact either way (int for whole numbers in the JSON, else Decimal)."""

# Adjusted exponents a measurement may have: ample for metres and points, and it keeps every
# sum of them exact within the aggregation's decimal context (aggregate/windows.py).
_EXPONENTS: Final = range(-30, 31)


class Reading(NamedTuple):
    # A tuple: made once per reading, and the cheapest immutable record to make.
    name: str
    time_ms: int
    """StatusTime in epoch milliseconds (UTC)."""
    distance: Number
    magic: Number
    health: Number


def decode_reading(data: bytes) -> tuple[ItemKey, Reading]:
    """The reading in one record's data (routing key: name and StatusTime), or RecordError.

    Every exception is the record's own fault (deep nesting breaks json with RecursionError):
    it is dead-lettered and the shard moves on."""
    try:
        fast = _decode_plain(data)
        if fast is not None:
            return fast
        reading, status_time = _decode(data)
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(f"cannot be decoded: {type(exc).__name__}: {exc}"[:500]) from None
    return (reading.name, status_time), reading


# A window record's partition key is the unicorn's Name, and Kinesis takes partition keys of
# up to 256 Unicode characters: a longer Name could never be put, so it is refused here.
MAX_NAME_LENGTH: Final = 256


def _decode_plain(data: bytes) -> tuple[ItemKey, Reading] | None:
    """The reading of a record whose measurements are integers, with orjson; None for
    anything else, left to the exact decoder (which accepts or refuses it as before).

    orjson returns `int` only for integers in 64 bits (larger ones come back as float), far
    inside the bound on magnitudes, so an int here is always in range. What orjson refuses
    (NaN, lone surrogates, bad UTF-8, deep nesting) goes to the exact decoder too, so what is
    accepted stays the same (tests/aggregate/test_readings.py compares both)."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if type(body) is not dict:
        return None
    name = body.get("Name")
    status_time = body.get("StatusTime")
    distance = body.get("Distance")
    magic = body.get("MagicPoints")
    health = body.get("HealthPoints")
    # `type(...) is int`: a bool is an int to isinstance, and a number to no one.
    if (
        type(name) is not str
        or type(status_time) is not str
        or type(distance) is not int
        or type(magic) is not int
        or type(health) is not int
        or not name
        or len(name) > MAX_NAME_LENGTH
    ):
        return None
    time_ms = status_time_to_epoch_ms(status_time)
    return (name, status_time), Reading(name, time_ms, distance, magic, health)


def _decode(data: bytes) -> tuple[Reading, str]:
    body, name, status_time = decode_body(data)
    if len(name) > MAX_NAME_LENGTH:
        raise RecordError(f"Name is longer than {MAX_NAME_LENGTH} characters")
    time_ms = status_time_to_epoch_ms(status_time)
    reading = Reading(
        name,
        time_ms,
        _number(body, "Distance"),
        _number(body, "MagicPoints"),
        _number(body, "HealthPoints"),
    )
    return reading, status_time


def _number(body: dict[str, object], field: str) -> Number:
    value = body.get(field)
    # bool is an int to Python, not a number to anyone else.
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise RecordError(f"{field} is missing or not a number")
    number = Decimal(value)
    if not number.is_finite() or (number != 0 and number.adjusted() not in _EXPONENTS):
        raise RecordError(f"{field} is out of range: {value}")
    return value
