"""Fixtures of the aggregator's tests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.aggregate.test_aggregate import aggregate_settings
from wildrydes_stream.admin.provision import ensure_stream
from wildrydes_stream.config import Settings


@pytest.fixture
async def streams(settings: Settings, kinesis: Any) -> Settings:
    """A 2-shard raw stream and a 1-shard output stream (one shard: one order to read)."""
    s = aggregate_settings(settings)
    await ensure_stream(kinesis, s.raw_stream_name, 2)
    await ensure_stream(kinesis, s.stream_name, 1)
    return s
