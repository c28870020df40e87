"""Differential tests of the aggregator's decoding shortcuts: each gives exactly what the full
path gives.

- Readings: `decode_reading` takes readings with integer measurements through orjson and
  leaves everything else to the exact json+Decimal decoder (`_decode`); both must agree on
  every record, reading for reading and refusal for refusal.
- StatusTime: `status_time_to_epoch_ms` reads the canonical form by slicing once its minute has
  been through the full parser (`_parse_status_time`); both must agree on every text.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from wildrydes_stream.aggregate.readings import Reading, _decode, _decode_plain, decode_reading
from wildrydes_stream.errors import RecordError
from wildrydes_stream.produce.model import Unicorn, status_time
from wildrydes_stream.records import fields
from wildrydes_stream.records.fields import _parse_status_time, status_time_to_epoch_ms

T0 = datetime(2017, 6, 5, 9, 17, 8, 189_000, tzinfo=UTC)
PLAIN = Unicorn("Shadowfax", random.Random(3)).reading(T0).encode()
EDGE_CASES = [
    PLAIN,
    PLAIN.rstrip(b"\n"),
    PLAIN.replace(b'"Distance":', b'"Distance":-'),
    PLAIN.replace(b'"Distance":', b'"Distance":0,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":-0,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":29.8,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":29.80,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":1e2,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":1E+31,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":0.1000000000000000055511151231257827,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":18446744073709551615,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":18446744073709551616,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":-9223372036854775809,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":' + b"9" * 31 + b',"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":' + b"9" * 32 + b',"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":"12","Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":true,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":null,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":NaN,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":Infinity,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Was":'),
    PLAIN.replace(b'"MagicPoints":', b'"MagicPoints":false,"Was":'),
    PLAIN.replace(b'"MagicPoints":', b'"MagicPoints":[1],"Was":'),
    PLAIN.replace(b'"HealthPoints":', b'"HealthPoints":1.5,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Name":"Other","Distance":'),  # duplicate key: last wins
    PLAIN.replace(b'"Distance":', b'"Odd":"\\ud800","Distance":'),
    PLAIN.replace(b'"Shadowfax"', b'"Shadow\\ud800fax"'),
    PLAIN.replace(b'"Shadowfax"', b'""'),
    PLAIN.replace(b'"Shadowfax"', b"7"),
    PLAIN.replace(b'"Shadowfax"', b'"' + b"x" * 256 + b'"'),
    PLAIN.replace(b'"Shadowfax"', b'"' + b"x" * 257 + b'"'),
    PLAIN.replace(b'"Shadowfax"', '"\u00e9t\u00e9"'.encode()),
    PLAIN.replace(b"Shadowfax", b"Shadow\xfffax"),
    PLAIN.replace(b"09:17:08.189", b"09:17:60.189"),
    PLAIN.replace(b"2017-06-05", b"2017-02-30"),
    PLAIN.replace(b"09:17:08.189", b"09:17:08"),
    PLAIN.replace(b"09:17:08.189", b"09:17:08.189Z"),
    PLAIN.replace(b"2017-06-05 09", b"2017-06-05T09"),
    PLAIN.replace(b'"2017-06-05 09:17:08.189"', b"1496654228189"),
    b"\xef\xbb\xbf" + PLAIN,
    b" " + PLAIN,
    PLAIN[:-3],
    b"[" * 5000 + b"]" * 5000,
    b"[]",
    b"42",
    b"",
]


def _exact(data: bytes) -> Any:
    try:
        reading, status_time = _decode(data)
    except RecordError as exc:
        return ("refused", str(exc))
    except Exception as exc:  # what decode_reading turns into "cannot be decoded"
        return ("refused", f"cannot be decoded: {type(exc).__name__}: {exc}"[:500])
    return (reading.name, status_time), reading


def _public(data: bytes) -> Any:
    try:
        return decode_reading(data)
    except RecordError as exc:
        return ("refused", str(exc))


def _taken_fast(data: bytes) -> bool:
    try:
        return _decode_plain(data) is not None
    except RecordError:
        return True  # refused by the shortcut itself (its StatusTime)


def _fleet(seconds: int, unicorns: int) -> list[bytes]:
    rng = random.Random(11)
    fleet = [Unicorn(f"U{n}", random.Random(rng.random())) for n in range(unicorns)]
    return [
        u.reading(T0 + timedelta(seconds=s, milliseconds=n)).encode()
        for s in range(seconds)
        for n, u in enumerate(fleet)
    ]


def test_the_fast_decoder_gives_the_exact_decoders_reading_or_refusal() -> None:
    taken = 0
    for data in _fleet(150, 20) + EDGE_CASES:
        public, exact = _public(data), _exact(data)
        assert public == exact, data
        # Values alike and of a kind alike: an int stays an int, a fraction a Decimal.
        if isinstance(public[1], Reading):
            assert [type(v) for v in public[1]] == [type(v) for v in exact[1]], data
        taken += _taken_fast(data)
    # The shortcut is really taken for the producer's readings (not everything falls back).
    assert taken >= 150 * 20


def test_integers_stay_int_and_fractions_stay_exact_decimals() -> None:
    _, whole = decode_reading(PLAIN.replace(b'"Distance":', b'"Distance":12,"Was":'))
    _, fraction = decode_reading(PLAIN.replace(b'"Distance":', b'"Distance":29.80,"Was":'))
    assert type(whole.distance) is int
    assert whole.distance == 12
    assert type(fraction.distance) is Decimal
    assert str(fraction.distance) == "29.80"


def _canonical_texts() -> list[str]:
    rng = random.Random(5)
    texts = []
    for _ in range(3000):
        at = datetime(1971, 1, 1, tzinfo=UTC) + timedelta(
            milliseconds=rng.randrange(0, 80 * 365 * 86400 * 1000)
        )
        texts.append(status_time(at))
    return texts


ODD_TIMES = [
    "2016-02-12 00:00:60.000",
    "2016-02-12 00:00:99.000",
    "2016-02-12 00:00:-1.000",
    "2016-02-12 00:00:+1.000",
    "2016-02-12 00:00:1_.000",
    "2016-02-12 00:00: 1.000",
    "2016-02-12 00:00:01.-10",
    "2016-02-12 00:00:01.1_0",
    "2016-02-12 00:00:01. 10",
    "2016-02-12 00:00:0\u0661.000",  # an Arabic-Indic digit
    "2016-02-12 00:00:0\u00b2.000",  # a superscript: a digit to isdigit, not to int
    "2016-02-12 00:00:01.00\u00b2",
    "2016-02-12 00:00:01.\u0661\u0662\u0663",
    "2016-02-12 00:00:01\u00b7000",
    "2016-02-12 00:00;01.000",
    "2016-02-12 00:00:01.0000",
    "2016-02-12 00:00:01.00",
    "2016-02-12 00:00:01.000Z",
    "2016-02-12T00:00:01.000",
    "2016-02-30 00:00:01.000",
    "2016-02-12 24:00:01.000",
    "1969-12-31 23:59:59.999",
    "2016-02-12 00:00:59.999",
]


def _either(parse: Any, text: str) -> Any:
    try:
        return parse(text)
    except RecordError as exc:
        return ("refused", str(exc))


@pytest.mark.parametrize("primed", [False, True])
def test_the_fast_status_time_reader_agrees_with_the_full_parser(primed: bool) -> None:
    fields._MINUTES.clear()
    texts = _canonical_texts() + ODD_TIMES
    if primed:
        # Every text's minute known already: the sliced path answers whatever it can.
        for text in texts:
            _either(status_time_to_epoch_ms, text[:16] + ":00.000")
    for text in texts + texts:  # the second round meets the minutes the first one learnt
        assert _either(status_time_to_epoch_ms, text) == _either(_parse_status_time, text), text
    assert fields._MINUTES, "the minute look-up was never filled"


def test_the_minute_look_up_stays_bounded() -> None:
    fields._MINUTES.clear()
    start = datetime(2016, 2, 12, tzinfo=UTC)
    for minute in range(fields._MAX_MINUTES * 2 + 10):
        at = start + timedelta(minutes=minute, seconds=7, milliseconds=5)
        assert status_time_to_epoch_ms(status_time(at)) == int(at.timestamp() * 1000)
    assert len(fields._MINUTES) <= fields._MAX_MINUTES
