"""A raw sensor reading: decode and validate one record of the `wildrydes` stream.

Numbers are kept as Decimal (the JSON text, exactly): Distance may be a float in the readings,
and its per-minute sum must not pick up binary rounding. Their magnitude is bounded so that an
exact sum stays cheap (a reading of 1e999999 metres is that record's fault, not the window's).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from wildrydes_stream.errors import RecordError
from wildrydes_stream.records.envelope import ItemKey
from wildrydes_stream.records.fields import decode_body, status_time_to_epoch_ms

# Adjusted exponents a measurement may have: ample for metres and points, and it keeps every
# sum of them exact within the aggregation's decimal context (aggregate/windows.py).
_EXPONENTS: Final = range(-30, 31)


@dataclass(frozen=True, slots=True)
class Reading:
    name: str
    time_ms: int
    """StatusTime in epoch milliseconds (UTC)."""
    distance: Decimal
    magic: Decimal
    health: Decimal


def decode_reading(data: bytes) -> tuple[ItemKey, Reading]:
    """The reading in one record's data (routing key: name and StatusTime), or RecordError.

    Every exception is the record's own fault (deep nesting breaks json with RecursionError):
    it is dead-lettered and the shard moves on."""
    try:
        reading, status_time = _decode(data)
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(f"cannot be decoded: {type(exc).__name__}: {exc}"[:500]) from None
    return (reading.name, status_time), reading


# A window record's partition key is the unicorn's Name, and Kinesis takes partition keys of
# up to 256 Unicode characters: a longer Name could never be put, so it is refused here.
MAX_NAME_LENGTH: Final = 256


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


def _number(body: dict[str, object], field: str) -> Decimal:
    value = body.get(field)
    # bool is an int to Python, not a number to anyone else.
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise RecordError(f"{field} is missing or not a number")
    number = Decimal(value)
    if not number.is_finite() or (number != 0 and number.adjusted() not in _EXPONENTS):
        raise RecordError(f"{field} is out of range: {value}")
    return number
