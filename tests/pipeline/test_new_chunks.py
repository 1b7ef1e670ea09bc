"""Writers that begin a new TimescaleDB chunk together: real BatchWriters on a real
TimescaleDB (``TIMESCALEDB_URL``, or one on 127.0.0.1:5433), dead letters on a real broker."""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from ingest.pipeline.sink import Item
from tests.support import call_events, consumed, one_connection_writer

pytestmark = pytest.mark.timescaledb
_offsets = itertools.count()


def _calls_on(topic: str, partition: int, day: datetime, calls: int) -> list[Item]:
    evs = [e for _ in range(calls) for e in call_events(uuid.uuid4(), day + timedelta(hours=9))]
    return consumed(topic, partition, _offsets, evs)


async def test_two_writers_beginning_a_new_chunk_together_both_store_without_a_deadlock(
    timescale_url, topics
):
    # Days no test writes: each has no chunk yet. Without the lock on calls, every one of
    # these days ended in a deadlock between the two writers (20 of 20).
    first = datetime(2031, 1, 1, tzinfo=UTC) + timedelta(days=random.randrange(0, 3000, 10))
    async with (
        one_connection_writer(timescale_url, topics, dedup_window=None) as a,
        one_connection_writer(timescale_url, topics, dedup_window=None) as b,
    ):
        for d in range(3):
            day = first + timedelta(days=d)
            batches = [_calls_on(topics.source, p, day, 40) for p in (0, 1)]
            results: list[Any] = await asyncio.gather(
                a.write(batches[0]), b.write(batches[1]), return_exceptions=True
            )
            assert [type(r).__name__ for r in results] == ["WriteResult", "WriteResult"]
            assert [len(r.written) for r in results] == [200, 200]
    conn = await asyncpg.connect(timescale_url)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM call_events WHERE created_at >= $1 AND created_at < $2",
            first,
            first + timedelta(days=3),
        )
    finally:
        await conn.close()
    assert stored == 1200
