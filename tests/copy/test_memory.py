"""Memory is bounded in bytes: large records on many shards behind a slow table.

Each poller blocked on a full queue would otherwise hold its whole GetRecords page (up to
10 MB), and the queues hold records by count whatever their size. The service runs as a child
process so its resident memory can be read from /proc while it catches up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.copy.test_faults import make_records
from tests.faultproxy import FaultProxy
from tests.helpers import put_records, wait_for
from tests.process import ServiceProcess, service_env
from tests.test_process import metric_total
from wildrydes_stream.admin.provision import ensure_stream, ensure_table
from wildrydes_stream.config import Settings

SHARDS = 8
RECORD_BYTES = 100_000


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def test_large_records_on_many_shards_keep_resident_memory_flat(
    settings: Settings,
    aws_env: dict[str, str],
    kinesis: Any,
    dynamodb: Any,
    dynamodb_proxy: FaultProxy,
) -> None:
    await ensure_stream(kinesis, settings.stream_name, SHARDS)
    await ensure_table(dynamodb, settings)
    bound = 4 * 1024 * 1024
    env = service_env(
        settings,
        {**aws_env, "AWS_ENDPOINT_URL_DYNAMODB": dynamodb_proxy.endpoint},
        max_buffered_bytes=bound,
        checkpoint_interval_seconds=1.0,
        writers=2,
    )
    # The table is the bottleneck: every write waits, so records pile up wherever they may.
    dynamodb_proxy.delay("BatchWriteItem", 1.0)
    service = await ServiceProcess.start(env, "run")
    try:
        await service.started()
        idle = rss_bytes(service.pid)
        # ~48 MB of records, spread over every shard by their names.
        records = [
            {**record, "Note": "x" * RECORD_BYTES}
            for record in make_records(480, names=tuple(f"Unicorn{i}" for i in range(24)))
        ]
        # Under 1 MB a call: aiohttp warns about larger bodies sent from bytes.
        for start in range(0, len(records), 6):
            await put_records(kinesis, settings.stream_name, records[start : start + 6])

        peak = idle

        async def written_all() -> bool:
            nonlocal peak
            peak = max(peak, rss_bytes(service.pid))
            status, text = await service.get("/metrics")
            assert status == 200
            return metric_total(text, "wildrydes_records_written_total") >= len(records)

        await wait_for(written_all, timeout=120, interval=0.1)
    finally:
        await service.close()
    grown = peak - idle
    # The bound counts record bytes; the decoded items, the JSON pages and the write requests
    # built from them make a few copies (measured: +25 MiB at this bound). 48 MB went through
    # two slow writers: without the bound the pages and the queues hold most of it at once
    # (measured: +104 MiB).
    assert grown < 12 * bound, f"resident memory grew by {grown / 2**20:.0f} MiB"
