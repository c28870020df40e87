"""The fields every record of this project shares: a JSON object with a string `Name` and a
`StatusTime` of `YYYY-MM-DD HH:MM:SS.mmm` (UTC, no zone)."""

from __future__ import annotations

import calendar
import json
import re
from decimal import Decimal
from typing import Any, Final

from wildrydes_stream.errors import RecordError

_STATUS_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?Z?")

# One decoder for every record: json.loads with parse_float would build a new one each call.
_JSON: Final = json.JSONDecoder(parse_float=Decimal)


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


def status_time_to_epoch_ms(text: str) -> int:
    """`2016-02-12 00:01:00.000` (UTC, no zone) -> epoch milliseconds.

    The canonical form (23 characters, as every producer of this project writes it) is read
    by slicing, with the minute it falls in looked up: a fleet sends thousands of readings a
    minute and only the seconds differ. Anything else, and each minute the first time, goes
    through the full parser, which checks every part and fills the lookup."""
    if len(text) == 23 and text[16] == ":" and text[19] == ".":
        minute_ms = _MINUTES.get(text[:16])
        if minute_ms is not None:
            seconds, millis = text[17:19], text[20:23]
            # ASCII digits only (str.isdigit alone takes other scripts' digits, which the full
            # parser handles); second 60 and above goes there too, to be refused.
            if seconds.isdigit() and millis.isdigit() and (seconds + millis).isascii():
                second = int(seconds)
                if second < 60:
                    return minute_ms + second * 1000 + int(millis)
    epoch_ms = _parse_status_time(text)
    if len(text) == 23 and text[16] == ":" and text[19] == "." and text[10] == " ":
        if len(_MINUTES) >= _MAX_MINUTES:
            _MINUTES.clear()  # a fleet is on a few minutes at a time: start over
        _MINUTES[text[:16]] = epoch_ms - epoch_ms % 60_000
    return epoch_ms


# `YYYY-MM-DD HH:MM` -> epoch ms of that minute, for minutes the full parser has accepted.
_MINUTES: Final[dict[str, int]] = {}
_MAX_MINUTES: Final = 4096


def _parse_status_time(text: str) -> int:
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
