"""Differential tests of the hot path's shortcuts: each gives exactly what the plain path gives.

- Decoding: `decode_item` takes records of strings and integers through orjson and leaves
  everything else to the exact json+Decimal path (`_decode_item`); both must agree on every
  record, item for item and refusal for refusal.
- Hand-over: pages go from the pollers to the writers in one `put_many`; the items written and
  the checkpoints must be those the plain decoder predicts, record for record.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from bench.data import aggregates, encode
from prometheus_client import CollectorRegistry

from tests.faultproxy import FaultProxy
from tests.helpers import SHADOWFAX, holds, read_shadowfax, scan_table, wait_for
from tests.test_process import last_sequence_per_shard, leases_of
from wildrydes_stream.config import Settings, StatusTimeFormat
from wildrydes_stream.consumer.progress import ShardProgress
from wildrydes_stream.copy.app import Service
from wildrydes_stream.copy.item import _decode_item, decode_item
from wildrydes_stream.errors import RecordError
from wildrydes_stream.observability.metrics import Metrics
from wildrydes_stream.records.envelope import Envelope, item_key_of
from wildrydes_stream.runtime.budget import ByteBudget
from wildrydes_stream.sink.deadletter import DeadLetters, FileDestination, Retry
from wildrydes_stream.sink.dynamodb import WriterPool
from wildrydes_stream.source.poller import CAUGHT_UP_LIMIT

FORMATS: tuple[StatusTimeFormat, ...] = ("epoch_ms", "string")

PLAIN = encode(aggregates(1)[0])
EDGE_CASES = [
    PLAIN,
    PLAIN.replace(b'"Distance":', b'"Distance":-'),
    PLAIN.replace(b'"Distance":', b'"Note":"x","Distance":'),
    PLAIN.replace(b'"Distance":', b'"Note":"\\u00e9\\n\\"","Distance":'),
    PLAIN.replace(b'"Distance":', b'"Name":"Other","Distance":'),  # duplicate key: last wins
    PLAIN.replace(b'"Distance":', b'"Distance":0,"Zero":-0,"Distance2":'),
    PLAIN.replace(b'"Distance":', b'"Distance":1.5,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":1.10,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":1e2,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":0.0000001,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Big":18446744073709551615,"Distance":'),
    PLAIN.replace(b'"Distance":', b'"Big":18446744073709551616,"Distance":'),
    PLAIN.replace(b'"Distance":', b'"Big":-9223372036854775809,"Distance":'),
    PLAIN.replace(b'"Distance":', b'"Big":' + b"9" * 38 + b',"Distance":'),
    PLAIN.replace(b'"Distance":', b'"Big":' + b"9" * 39 + b',"Distance":'),
    PLAIN.replace(b'"Distance":', b'"Flag":true,"Distance":'),
    PLAIN.replace(b'"Distance":', b'"Gone":null,"Distance":'),
    PLAIN.replace(b'"Distance":', b'"Nested":[1],"Distance":'),
    PLAIN.replace(b'"Distance":', b'"Distance":"12","Was":'),
    PLAIN.replace(b'"Distance":', b'"Distance":NaN,"Was":'),
    PLAIN.replace(b'"Distance":', b'"Odd":"\\ud800","Distance":'),
    PLAIN.replace(b'"Shadowfax"', b'""'),
    PLAIN.replace(b'"Shadowfax"', b"7"),
    PLAIN.replace(b'"2016-02-12 00:00:00.000"', b'"2016-02-30 00:00:00.000"'),
    PLAIN.replace(b'"2016-02-12 00:00:00.000"', b"1455235200000"),
    PLAIN.replace(b'"2016-02-12 00:00:00.000"', b'"2016-02-12T00:00:00Z"'),
    b"\xef\xbb\xbf" + PLAIN,
    PLAIN + b"  ",
    b" " + PLAIN,
    PLAIN[:-1],
    PLAIN.replace(b"Shadowfax", b"Shadow\xfffax"),
    b"[]",
    b"42",
    b"",
]


def _plain(data: bytes, status_time_format: StatusTimeFormat) -> Any:
    try:
        return _decode_item(data, status_time_format)
    except RecordError as exc:
        return ("refused", str(exc))
    except Exception as exc:  # what decode_item turns into "cannot be decoded"
        return ("refused", f"cannot be decoded: {type(exc).__name__}: {exc}"[:500])


def _fast(data: bytes, status_time_format: StatusTimeFormat) -> Any:
    try:
        return decode_item(data, status_time_format)
    except RecordError as exc:
        return ("refused", str(exc))


@pytest.mark.parametrize("status_time_format", FORMATS)
def test_the_fast_decoder_gives_the_exact_decoders_item_or_refusal(
    status_time_format: StatusTimeFormat,
) -> None:
    records = [encode(r) for r in aggregates(2000)] + EDGE_CASES
    if SHADOWFAX.exists():
        records += [json.dumps(r, separators=(",", ":")).encode() for r in read_shadowfax()]
    for data in records:
        fast, plain = _fast(data, status_time_format), _plain(data, status_time_format)
        assert fast == plain, data
        if not isinstance(fast[0], str):
            # Same attributes in the same order: the request bodies are byte for byte alike.
            assert list(fast[1]) == list(plain[1]), data


async def test_a_page_handed_over_at_once_writes_what_the_plain_decoder_predicts(
    resources: Settings, kinesis: Any, dynamodb: Any, tmp_path: Path
) -> None:
    # Plain aggregates, a key repeated later in the stream, exact-path records and bad ones,
    # across the four shards in pages of up to 100.
    records = [encode(r) for r in aggregates(1200)]
    records[600] = records[10].replace(b'"Distance":', b'"Distance":2.50,"Was":')
    records[601] = EDGE_CASES[7]
    records[602] = b"not json"
    records[603] = PLAIN.replace(b'"Distance":', b'"Distance":"12","Was":')
    settings = resources.replace(get_records_limit=100, deadletter_file=str(tmp_path / "dl"))
    put: list[dict[str, Any]] = []
    for start in range(0, len(records), 500):
        # Partitioned by unicorn, as the producers do: a key's records share a shard.
        entries = [
            {"Data": data, "PartitionKey": data[9:19].decode(errors="replace") or "x"}
            for data in records[start : start + 500]
        ]
        response = await kinesis.put_records(StreamName=settings.stream_name, Records=entries)
        put += response["Records"]

    service = Service(settings)
    async with service:
        await service.run_burst()

    expected: dict[tuple[str, str], Any] = {}
    refused = 0
    for data in records:  # in stream order per key: the later record for a key wins
        try:
            key, item = _decode_item(data, settings.status_time_format)
        except RecordError:
            refused += 1
            continue
        expected[key] = _by_value(item)
    items = await scan_table(dynamodb, settings.table_name)
    assert {item_key_of(item): _by_value(item) for item in items} == expected
    snapshot = service.metrics.snapshot()
    assert snapshot.dead_lettered == refused == 2
    assert len((tmp_path / "dl").read_text().splitlines()) == refused
    # Every shard checkpointed at its last record: nothing is left to read again.
    last = last_sequence_per_shard(put)
    assert len(last) == 4  # every shard had records
    leases = await leases_of(dynamodb, settings)
    assert {shard: lease.checkpoint for shard, lease in leases.items()} == {
        shard: str(sequence) for shard, sequence in last.items()
    }


def _by_value(item: dict[str, Any]) -> dict[str, Any]:
    """Numbers as values: the table gives `2.50` back as `2.5`."""
    return {
        name: {"N": Decimal(value["N"])} if "N" in value else value for name, value in item.items()
    }


async def test_a_page_cancelled_while_waiting_for_room_gives_back_the_bytes_it_did_not_queue(
    settings: Settings,
) -> None:
    # Writers not started: nothing leaves the queues, so the page waits for room.
    bounded = settings.replace(queue_size=10, writers=2)
    budget = ByteBudget(10_000_000)
    metrics = Metrics(CollectorRegistry())
    deadletters = DeadLetters([FileDestination(bounded.deadletter_file, Retry(metrics))], metrics)
    pool = WriterPool(None, bounded, deadletters, metrics, _fail, budget=budget)
    progress = ShardProgress("shardId-000000000000")
    page = [encode(r) for r in aggregates(40)]
    envelopes = []
    for sequence, data in enumerate(page, start=1):
        key, item = decode_item(data, "epoch_ms")
        envelopes.append(Envelope(progress.shard_id, sequence, key, item, 0.0, data, progress))
    budget.take(sum(len(data) for data in page))  # as the poller holds a page it read

    put = asyncio.create_task(pool.put_many(envelopes))
    await wait_for(holds(lambda: pool.depth() == 10))  # both queues full, the rest waits
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put

    queued = [e for queue in pool._queues for e in queue.records]
    assert len(queued) == 10
    # The queued records' bytes stay counted (their writer gives them back); the rest are
    # given back now, or the bound would shrink by a page at every cancelled hand-over.
    assert budget.used == sum(len(e.data) for e in queued)
    # Each writer's records are a prefix of its share of the page, in order.
    for queue in pool._queues:
        records = list(queue.records)
        share = [e for e in envelopes if hash(e.key) % 2 == hash(records[0].key) % 2]
        assert records == share[: len(records)]


def _fail(exc: BaseException) -> None:
    raise AssertionError(f"a writer failed: {exc!r}")


def test_free_text_is_not_kept_for_sharing_and_the_shared_values_stay_bounded() -> None:
    from wildrydes_stream.copy import item as records

    for n in range(records._MAX_SHARED_ATTRIBUTES + 100):
        data = PLAIN.replace(b'"Distance":', b'"Note":"%s","Distance":' % (b"x%06d" % n * 20))
        assert decode_item(data, "epoch_ms")[1]["Note"] == {"S": (f"x{n:06d}" * 20)}
    kept = records._SHARED_ATTRIBUTES
    assert len(kept) <= records._MAX_SHARED_ATTRIBUTES
    assert all(len(value) <= records._MAX_SHARED_STRING for value in kept if isinstance(value, str))


async def test_a_caught_up_shard_asks_for_a_small_page_and_a_full_one_once_behind(
    one_shard: Settings, kinesis_proxy: FaultProxy, kinesis: Any, dynamodb: Any
) -> None:
    # Each poll reserves its Limit's worth of bytes in the byte bound before the call: idle
    # shards asking for 10,000 records each would hold the bound between them for nothing.
    settings = one_shard.replace(
        idle_poll_interval_seconds=0.05,
        get_records_limit=5000,
        max_buffered_bytes=2**34,  # a bound that never lowers the Limit itself
    )
    async with Service(settings) as service:
        await wait_for(holds(lambda: len(kinesis_proxy.get_records_limits) >= 5))
        assert kinesis_proxy.get_records_limits[0] == 5000
        assert set(kinesis_proxy.get_records_limits[1:5]) == {CAUGHT_UP_LIMIT}
        calls_before = len(kinesis_proxy.get_records_limits)
        records = [encode(r) for r in aggregates(1000)]
        await kinesis.put_records(
            StreamName=settings.stream_name,
            Records=[{"Data": data, "PartitionKey": "x"} for data in records[:500]],
        )
        await kinesis.put_records(
            StreamName=settings.stream_name,
            Records=[{"Data": data, "PartitionKey": "x"} for data in records[500:]],
        )
        await wait_for(holds(lambda: service.metrics.snapshot().written == len(records)))
    after = kinesis_proxy.get_records_limits[calls_before:]
    # The first poll after the burst arrived asks for the small page, finds it full and asks
    # for the whole page at once.
    first_full = after.index(5000)
    assert set(after[:first_full]) == {CAUGHT_UP_LIMIT}
