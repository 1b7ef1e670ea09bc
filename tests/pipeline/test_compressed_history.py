"""Late and repeated events against compressed chunks, on TimescaleDB, through a real worker
and a real broker: a late event is stored once and updates its call; a repeat of an event
that sits in a compressed chunk is dropped as a duplicate, never doubled or dead-lettered."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest_asyncio
from prometheus_client import REGISTRY

from tests.support import (
    Topics,
    call_events,
    drained,
    publish,
    read_topic,
    reconcile,
    record,
    running_worker,
    worker_env,
)


def _long_ago() -> datetime:
    """Noon 20 days ago: well inside the chunks the compression policy (7 days) compresses,
    and far from a chunk boundary, so a whole call stays in one chunk."""
    return (datetime.now(UTC) - timedelta(days=20)).replace(
        hour=12, minute=0, second=0, microsecond=0
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tsdb(timescale_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the session's migrated TimescaleDB database."""
    pool = await asyncpg.create_pool(timescale_url, min_size=1, max_size=2)
    yield pool
    await pool.close()


async def _history(db: asyncpg.Pool, events: list[dict]) -> None:
    """Store events as the worker would have, long ago, then compress their chunks."""
    init = events[0]
    assert init["event_type"] == "initiation"
    await db.execute(
        "INSERT INTO calls (id, from_number, to_number, status, created_at) "
        "VALUES ($1, $2, $3, 'in_progress', $4)",
        uuid.UUID(init["call_id"]),
        init["event_data"]["from_number"],
        init["event_data"]["to_number"],
        datetime.fromisoformat(init["created_at"]),
    )
    await db.executemany(
        "INSERT INTO call_events (id, call_id, event_type, event_data, created_at) "
        "VALUES ($1, $2, $3, $4, $5)",
        [
            (
                uuid.UUID(e["id"]),
                uuid.UUID(e["call_id"]),
                e["event_type"],
                orjson.dumps(e["event_data"]).decode(),
                datetime.fromisoformat(e["created_at"]),
            )
            for e in events
        ],
    )
    await db.execute(
        "SELECT compress_chunk(c, if_not_compressed => true) "
        "FROM show_chunks('call_events', older_than => now() - interval '7 days') c"
    )
    assert await _in_compressed_chunk(db, datetime.fromisoformat(init["created_at"]))


async def _in_compressed_chunk(db: asyncpg.Pool, at: datetime) -> bool:
    return bool(
        await db.fetchval(
            "SELECT is_compressed FROM timescaledb_information.chunks "
            "WHERE hypertable_name = 'call_events' AND range_start <= $1 AND range_end > $1",
            at,
        )
    )


def _duplicates() -> float:
    return REGISTRY.get_sample_value("ingest_events_duplicate_total") or 0.0


async def test_a_late_event_in_a_compressed_chunk_is_stored_once_and_closes_its_call(
    timescale_url: str, tsdb: asyncpg.Pool, topics: Topics
) -> None:
    cid = uuid.uuid4()
    start = _long_ago()
    whole = call_events(cid, start)
    await _history(tsdb, whole[:4])
    late = whole[4]  # the termination, 60 s after the start: inside the compressed chunk
    assert await _in_compressed_chunk(tsdb, datetime.fromisoformat(late["created_at"]))

    pub = await publish(topics.bootstrap, topics.source, [record(late)])
    async with running_worker(worker_env(timescale_url, topics)):
        await drained(tsdb, topics, pub)

    copies = "SELECT count(*) FROM call_events WHERE id = $1"
    assert await tsdb.fetchval(copies, uuid.UUID(late["id"])) == 1
    row = await tsdb.fetchrow(
        "SELECT status, ended_at, duration, cost_cents FROM calls WHERE id = $1", cid
    )
    assert dict(row) == {
        "status": "completed",
        "ended_at": start + timedelta(seconds=60),
        "duration": timedelta(seconds=60),
        "cost_cents": 12,
    }
    assert await read_topic(topics.bootstrap, topics.dlq, settle_s=0.5) == []


async def test_a_repeat_of_an_event_in_a_compressed_chunk_is_dropped_as_a_duplicate(
    timescale_url: str, tsdb: asyncpg.Pool, topics: Topics
) -> None:
    cid = uuid.uuid4()
    whole = call_events(cid, _long_ago())
    await _history(tsdb, whole)
    await tsdb.execute(
        "UPDATE calls SET status = 'completed', ended_at = $2, duration = interval '60 s' "
        "WHERE id = $1",
        cid,
        datetime.fromisoformat(whole[4]["created_at"]),
    )
    repeats = [whole[2], whole[4]]  # a transcription and the termination, published again
    before = _duplicates()

    pub = await publish(topics.bootstrap, topics.source, [record(e) for e in repeats])
    async with running_worker(worker_env(timescale_url, topics)):
        await drained(tsdb, topics, pub)

    counts = await tsdb.fetch(
        "SELECT id, count(*) AS n FROM call_events WHERE call_id = $1 GROUP BY id", cid
    )
    assert sorted(r["n"] for r in counts) == [1] * len(whole)
    assert _duplicates() - before == len(repeats)
    assert await read_topic(topics.bootstrap, topics.dlq, settle_s=0.5) == []
    rec = await reconcile(tsdb, topics, pub)
    assert rec.problems == []
    assert await tsdb.fetchval("SELECT status FROM calls WHERE id = $1", cid) == "completed"
