"""Repeats and late events against compressed TimescaleDB chunks: a real worker, a real
broker, a real TimescaleDB (``TIMESCALEDB_URL``, or one on 127.0.0.1:5433)."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
import pytest_asyncio

from ingest.tools.migrate import Migrator, discover
from tests.support import (
    Topics,
    call_events,
    drained,
    event,
    http_get,
    publish,
    read_topic,
    record,
    running_worker,
    worker_env,
)

TIMESCALEDB_URL = os.environ.get("TIMESCALEDB_URL", "postgresql://postgres@127.0.0.1:5433/postgres")
pytestmark = pytest.mark.timescaledb


def _with_db(url: str, name: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, f"/{name}", p.query, p.fragment))


@pytest_asyncio.fixture(loop_scope="session")
async def tsdb_url() -> AsyncIterator[str]:
    """A fresh migrated database on the TimescaleDB server; skips when there is none."""
    try:
        admin = await asyncpg.connect(TIMESCALEDB_URL, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.skip(f"no TimescaleDB at TIMESCALEDB_URL or 127.0.0.1:5433: {exc}")
    name = f"ingest_test_ts_{uuid.uuid4().hex[:10]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = _with_db(TIMESCALEDB_URL, name)
        conn = await asyncpg.connect(url)
        try:
            await Migrator(conn, discover()).up()
            if not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
            ):
                pytest.skip(f"{TIMESCALEDB_URL} has no timescaledb extension")
        finally:
            await conn.close()
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _duplicates(port: int) -> float:
    _, body = await http_get(port, "/metrics")
    m = re.search(r"^ingest_events_duplicate_total (\S+)$", body, re.MULTILINE)
    assert m is not None
    return float(m.group(1))


async def test_repeats_and_late_events_in_compressed_chunks_are_stored_exactly_once(
    tsdb_url, topics: Topics
):
    old = datetime.now(UTC) - timedelta(days=30)
    cid = uuid.uuid4()
    first = call_events(cid, old)
    db = await asyncpg.create_pool(tsdb_url, min_size=1, max_size=2)
    try:
        async with running_worker(worker_env(tsdb_url, topics)) as worker:
            pub = await publish(topics.bootstrap, topics.source, [record(e) for e in first])
            await drained(db, topics, pub)
            # Compression is configured by the lifecycle migration; compress now, as its
            # policy would after 7 days.
            await db.execute(
                "SELECT compress_chunk(c, if_not_compressed => true) "
                "FROM show_chunks('call_events', older_than => interval '7 days') c"
            )
            compressed = await db.fetchval(
                "SELECT count(*) FROM timescaledb_information.chunks "
                "WHERE hypertable_name = 'call_events' AND is_compressed"
            )
            assert compressed >= 1
            before = await _duplicates(worker.probes.port)

            answer = next(e for e in first if e["event_type"] == "answer")
            repeat = {**answer, "event_data": {"other": "content"}}
            late = event(cid, "transcription", {"text": "late"}, at=old + timedelta(seconds=30))
            pub = await publish(
                topics.bootstrap, topics.source, [record(repeat), record(late), record(late)]
            )
            await drained(db, topics, pub)
            assert await _duplicates(worker.probes.port) - before == 2

        assert await read_topic(topics.bootstrap, topics.dlq) == []
        rows = await db.fetch(
            "SELECT id, event_data FROM call_events WHERE id = ANY($1::uuid[])",
            [uuid.UUID(answer["id"]), uuid.UUID(late["id"])],
        )
        stored = sorted((str(r["id"]), orjson.loads(r["event_data"])) for r in rows)
        assert stored == sorted(
            [(answer["id"], answer["event_data"]), (late["id"], {"text": "late"})]
        )
    finally:
        await db.close()
