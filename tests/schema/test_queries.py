"""Every file in schema/queries/ runs unchanged with ``psql -f`` on plain PostgreSQL, on
TimescaleDB, and on TimescaleDB with compressed chunks and a partly materialized aggregate,
and gives the known answers of a small known dataset."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
import pytest_asyncio

from ingest.tools.migrate import Migrator, discover, pause_lifecycle_jobs, schema_dir
from tests.conftest import (
    TEST_DATABASE_URL,
    _drop_timescale_database,
    _timescale_database,
    _with_db,
)

QUERIES = schema_dir() / "queries"
# Unaligned, tab-separated, no row-count footer: only the output format, never the SQL.
PSQL = ("psql", "-X", "-A", "-F", "\t", "-P", "footer=off", "-v", "ON_ERROR_STOP=1")
SERVERS = ("postgres", "timescaledb", "timescaledb-compressed")

pytestmark = pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")


def _hour_now() -> datetime:
    now = datetime.now(UTC)
    return now.replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class Call:
    """One call of the known dataset: its row and its events (offset in seconds, type, data)."""

    start: datetime
    status: str
    events: tuple[tuple[int, str, dict[str, Any]], ...]
    agent: bool = False

    @property
    def ended(self) -> datetime | None:
        ends = [o for o, t, _ in self.events if t == "termination"]
        return self.start + timedelta(seconds=ends[0]) if ends else None


def dataset(h0: datetime) -> dict[str, Call]:
    """Five calls: two completed in the last 24 h (one with an agent), one still open, one
    30 hours old, one 10 days old (outside every window)."""
    m10 = timedelta(minutes=10)
    init: tuple[int, str, dict[str, Any]] = (
        0,
        "initiation",
        {"from_number": "+14155550100", "to_number": "+14155550199"},
    )
    return {
        "recent_with_agent": Call(
            h0 - timedelta(hours=2) + m10,
            "completed",
            (
                init,
                (3, "answer", {}),
                (5, "transcription", {"transcription": "first"}),
                (6, "response", {"text": "hi"}),
                (20, "transcription", {"transcription": "latest"}),
                (60, "termination", {"status": "completed"}),
            ),
            agent=True,
        ),
        "recent_text_only": Call(
            h0 - timedelta(hours=3) + m10,
            "completed",
            (
                init,
                (5, "transcription", {"text": "only text"}),
                (120, "termination", {"status": "completed"}),
            ),
        ),
        "open": Call(
            h0 - timedelta(hours=1) + m10,
            "in_progress",
            (init, (3, "answer", {}), (5, "transcription", {"text": "still talking"})),
        ),
        "yesterday": Call(
            h0 - timedelta(hours=30) + m10,
            "completed",
            (
                init,
                (5, "transcription", {"text": "old"}),
                (90, "termination", {"status": "completed"}),
            ),
        ),
        "ten_days_ago": Call(
            h0 - timedelta(days=10) + m10,
            "completed",
            (
                init,
                (5, "transcription", {"text": "older"}),
                (30, "termination", {"status": "completed"}),
            ),
        ),
    }


@dataclass(frozen=True)
class Loaded:
    url: str
    server: str
    h0: datetime
    calls: dict[str, Call]
    ids: dict[str, uuid.UUID]


async def _load(url: str, server: str) -> Loaded:
    h0 = _hour_now()
    calls = dataset(h0)
    conn = await asyncpg.connect(url)
    try:
        await Migrator(conn, discover()).up()
        # The policies' background jobs (compress the 10-day-old chunk, refresh the
        # aggregate) would race the test's own compression and refresh and its assertions:
        # the test does both itself.
        await pause_lifecycle_jobs(conn)
        agent = await conn.fetchval(
            "INSERT INTO agents (name, voice_model, context_prompt) "
            "VALUES ('Ava', 'v1', 'be kind') RETURNING id"
        )
        ids = {}
        for name, call in calls.items():
            ended = call.ended
            ids[name] = await conn.fetchval(
                "INSERT INTO calls (from_number, to_number, status, agent_id, created_at, "
                "ended_at, duration) VALUES ('+14155550100', '+14155550199', $1, $2, $3, $4, "
                "$4::timestamptz - $3::timestamptz) RETURNING id",
                call.status,
                agent if call.agent else None,
                call.start,
                ended,
            )
            await conn.executemany(
                "INSERT INTO call_events (call_id, event_type, event_data, created_at) "
                "VALUES ($1, $2, $3, $4)",
                [
                    (ids[name], t, orjson.dumps(d).decode(), call.start + timedelta(seconds=o))
                    for o, t, d in call.events
                ],
            )
        # Counters of this session's inserts reach pg_stat first, then ANALYZE sets the
        # live-row counts: the other order would count the rows twice.
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("ANALYZE")
        if server == "timescaledb-compressed":
            await conn.execute("SELECT compress_chunk(c) FROM show_chunks('call_events') c")
            # Hours before h0 - 2h materialized, the later ones from real-time aggregation.
            await conn.execute(
                "CALL refresh_continuous_aggregate('call_events_hourly', NULL, $1::timestamptz)",
                h0 - timedelta(hours=2),
            )
    finally:
        await conn.close()
    return Loaded(url, server, h0, calls, ids)


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=SERVERS)
async def loaded(request: pytest.FixtureRequest) -> AsyncIterator[Loaded]:
    """A fresh database on one server with the known dataset."""
    server: str = request.param
    if server == "postgres":
        name = f"ingest_queries_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(TEST_DATABASE_URL)
        try:
            if await admin.fetchval(
                "SELECT current_setting('shared_preload_libraries') ILIKE '%timescaledb%'"
            ):
                pytest.skip("the PostgreSQL test server has timescaledb")
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        url = _with_db(TEST_DATABASE_URL, name)
    else:
        url = await _timescale_database()
    yield await _load(url, server)
    if server != "postgres":
        await _drop_timescale_database(url)
        return
    admin = await asyncpg.connect(TEST_DATABASE_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def psql(url: str, name: str) -> list[dict[str, str]]:
    """Run one query file as a user would (``psql -f``); its result as rows of text."""
    proc = subprocess.run(
        [*PSQL, "-d", url, "-f", str(QUERIES / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value).astimezone(UTC)


def test_every_query_file_is_tested() -> None:
    tested = {
        "call_history.sql",
        "hourly_analytics.sql",
        "events_by_type.sql",
        "connections.sql",
        "index_usage.sql",
        "table_statistics.sql",
        "chunks.sql",
        "compression.sql",
    }
    assert {p.name for p in QUERIES.glob("*.sql")} == tested


def test_call_history_lists_completed_calls_of_the_last_day_with_the_latest_transcription(
    loaded: Loaded,
) -> None:
    rows = psql(loaded.url, "call_history.sql")
    assert [(r["id"], r["agent_name"], r["transcription"], r["duration"]) for r in rows] == [
        (str(loaded.ids["recent_with_agent"]), "Ava", '"latest"', "00:01:00"),
        (str(loaded.ids["recent_text_only"]), "", '"only text"', "00:02:00"),
    ]


def test_hourly_analytics_counts_calls_started_and_averages_durations_over_seven_days(
    loaded: Loaded,
) -> None:
    rows = psql(loaded.url, "hourly_analytics.sql")
    h0 = loaded.h0
    assert [(_ts(r["hour"]), r["call_count"], r["avg_duration_seconds"]) for r in rows] == [
        (h0 - timedelta(hours=1), "1", ""),
        (h0 - timedelta(hours=2), "1", "60.0"),
        (h0 - timedelta(hours=3), "1", "120.0"),
        (h0 - timedelta(hours=30), "1", "90.0"),
    ]


def test_events_by_type_counts_each_type_per_hour_of_the_last_day(loaded: Loaded) -> None:
    rows = psql(loaded.url, "events_by_type.sql")
    got = {(_ts(r["hour"]), r["event_type"]): int(r["events"]) for r in rows}
    want: dict[tuple[datetime, str], int] = {}
    for call in loaded.calls.values():
        for offset, event_type, _ in call.events:
            at = call.start + timedelta(seconds=offset)
            hour = at.replace(minute=0, second=0, microsecond=0)
            if hour > datetime.now(UTC) - timedelta(hours=25):
                want[(hour, event_type)] = want.get((hour, event_type), 0) + 1
    assert got == want
    assert len(want) == 11


def test_connections_show_this_session(loaded: Loaded) -> None:
    rows = psql(loaded.url, "connections.sql")
    mine = [r for r in rows if r["datname"] == loaded.url.rsplit("/", 1)[1]]
    assert [(r["state"], r["application_name"], r["connections"]) for r in mine] == [
        ("active", "psql", "1")
    ]


def test_index_usage_lists_each_index_once_chunks_added_up(loaded: Loaded) -> None:
    rows = psql(loaded.url, "index_usage.sql")
    names = [(r["tablename"], r["indexname"]) for r in rows]
    assert names.count(("call_events", "idx_call_events_call_id")) == 1
    assert names.count(("calls", "idx_calls_created_at")) == 1
    assert not [t for t, _ in names if t.startswith("_")]
    copies = {(r["tablename"], r["indexname"]): int(r["copies"]) for r in rows}
    chunks = len({c.start.date() for c in loaded.calls.values()})
    expected = 1 if loaded.server == "postgres" else 1 + chunks
    assert copies[("call_events", "idx_call_events_call_id")] == expected


def test_table_statistics_add_chunks_up_under_their_table(loaded: Loaded) -> None:
    rows = {r["relname"]: r for r in psql(loaded.url, "table_statistics.sql")}
    assert rows["calls"]["n_live_tup"] == "5"
    assert rows["calls"]["chunks"] == "0"
    events = sum(len(c.events) for c in loaded.calls.values())
    chunks = len({c.start.date() for c in loaded.calls.values()})
    if loaded.server != "timescaledb-compressed":
        # Rows of compressed chunks are no longer live rows of a heap.
        assert rows["call_events"]["n_live_tup"] == str(events)
    assert rows["call_events"]["chunks"] == ("0" if loaded.server == "postgres" else str(chunks))


def test_chunks_lists_the_chunks_or_says_there_are_none(loaded: Loaded) -> None:
    rows = psql(loaded.url, "chunks.sql")
    if loaded.server == "postgres":
        assert list(rows[0]) == ["note"]
        assert "not installed" in rows[0]["note"]
        return
    days = sorted({c.start.date() for c in loaded.calls.values()}, reverse=True)
    assert [_ts(r["range_start"]).date() for r in rows] == days
    compressed = "t" if loaded.server == "timescaledb-compressed" else "f"
    assert {r["is_compressed"] for r in rows} == {compressed}
    assert all(int(r["total_bytes"]) > 0 for r in rows)


def test_compression_reports_chunks_compressed_and_the_policy(loaded: Loaded) -> None:
    rows = psql(loaded.url, "compression.sql")
    if loaded.server == "postgres":
        assert list(rows[0]) == ["note"]
        return
    (row,) = rows
    chunks = len({c.start.date() for c in loaded.calls.values()})
    assert row["total_chunks"] == str(chunks)
    assert row["compress_after"] == "7 days"
    if loaded.server == "timescaledb-compressed":
        assert row["compressed_chunks"] == str(chunks)
        assert float(row["ratio"]) > 0
    else:
        assert row["compressed_chunks"] == "0"
