"""Migrations against a real PostgreSQL server: up, down, status, concurrency, the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from ingest.tools.migrate import MigrationError, Migrator, create, discover, parse

SEED_TABLES = {"users", "agents", "calls", "call_events"}
SEED_INDEXES = {
    "idx_users_email",
    "idx_users_status",
    "idx_calls_created_at",
    "idx_calls_status",
    "idx_calls_from_number",
    "idx_calls_to_number",
    "idx_calls_agent_id",
    "idx_agents_active",
    "idx_agents_voice_model",
    "idx_agents_success_rate",
    "idx_call_events_call_id",
    "idx_call_events_type",
    "idx_call_events_created_at",
}


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


async def test_up_creates_the_seed_tables_constraints_and_indexes(postgres_empty_url):
    conn = await asyncpg.connect(postgres_empty_url)
    try:
        applied = await Migrator(conn, discover()).up()
        assert [m.version for m in applied] == [m.version for m in discover()]
        assert await _tables(conn) >= SEED_TABLES
        constraints = {r["conname"] for r in await conn.fetch("SELECT conname FROM pg_constraint")}
        assert {"valid_email", "valid_phone_numbers", "valid_event_type"} <= constraints
        indexes = {r["indexname"] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
        assert indexes >= SEED_INDEXES
        pk = await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'call_events_pkey'"
        )
        assert pk == "PRIMARY KEY (id, created_at)"
    finally:
        await conn.close()


async def test_up_twice_applies_nothing_the_second_time(postgres_empty_url):
    conn = await asyncpg.connect(postgres_empty_url)
    try:
        await Migrator(conn, discover()).up()
        assert await Migrator(conn, discover()).up() == []
    finally:
        await conn.close()


async def test_down_reverts_newest_first_and_up_restores(postgres_empty_url):
    conn = await asyncpg.connect(postgres_empty_url)
    try:
        m = Migrator(conn, discover())
        await m.up()
        undone = await m.down(steps=len(discover()))
        assert [x.version for x in undone] == sorted((x.version for x in discover()), reverse=True)
        assert not (SEED_TABLES & await _tables(conn))
        await m.up()
        assert await _tables(conn) >= SEED_TABLES
    finally:
        await conn.close()


async def test_status_lists_applied_and_pending_and_the_table_kind(postgres_empty_url):
    conn = await asyncpg.connect(postgres_empty_url)
    try:
        m = Migrator(conn, discover())
        await m.up(target="0001")
        st = await m.status()
        assert [s.applied_at is not None for s in st.migrations][:2] == [True, False]
        has_tsdb = await conn.fetchval(
            "SELECT count(*) > 0 FROM pg_extension WHERE extname = 'timescaledb'"
        )
        assert st.timescaledb == has_tsdb
        assert st.hypertable == has_tsdb
    finally:
        await conn.close()


async def test_concurrent_up_applies_each_migration_once(postgres_empty_url):
    conns = [await asyncpg.connect(postgres_empty_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(Migrator(c, discover()).up() for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, len(discover())]
        n = await conns[0].fetchval("SELECT count(*) FROM ingest_schema_migrations")
        assert n == len(discover())
    finally:
        for c in conns:
            await c.close()


def test_a_file_without_both_parts_is_refused(tmp_path: Path):
    (tmp_path / "0001_broken.sql").write_text("CREATE TABLE x ();\n")
    with pytest.raises(MigrationError, match="migrate:up"):
        parse(tmp_path / "0001_broken.sql")


def test_create_writes_the_next_numbered_file(tmp_path: Path):
    (tmp_path / "migrations").mkdir()
    first = create("Add user preferences", tmp_path)
    second = create("another", tmp_path)
    assert first.name == "0001_add_user_preferences.sql"
    assert second.name == "0002_another.sql"
    assert parse(second).up == ""


def test_cli_migrate_status_says_what_is_applied(database_url: str):
    out = subprocess.run(
        [sys.executable, "-m", "ingest", "migrate", "status"],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "0001_core_tables" in out
    assert "applied" in out
    assert "call_events:" in out


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"INGEST_BATCH_MAX_EVENTS": "lots"}, "INGEST_BATCH_MAX_EVENTS"),
        ({"DATABASE_POOL_MAX": "0"}, "DATABASE_POOL_MAX"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"INGEST_COMPRESS_AFTER": "soon"}, "INGEST_COMPRESS_AFTER"),
        ({"INGEST_RETENTION": "forever"}, "INGEST_RETENTION"),
    ],
)
def test_bad_configuration_prints_one_line_naming_the_variable_and_exits_2(env, variable):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "INGEST_"))}
    if variable != "DATABASE_URL":
        base["DATABASE_URL"] = "postgresql://postgres@127.0.0.1:5432/postgres"
    proc = subprocess.run(
        [sys.executable, "-m", "ingest", "run"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert variable in lines[0]


async def _timescaledb_loadable(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') "
            "OR (EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') "
            "AND current_setting('shared_preload_libraries') ILIKE '%timescaledb%')"
        )
    )


@pytest.mark.timescaledb
async def test_call_events_becomes_a_hypertable_with_the_configured_chunk_interval(
    timescale_empty_url: str,
):
    conn = await asyncpg.connect(timescale_empty_url)
    try:
        await Migrator(conn, discover(), chunk_interval="6 hours").up()
        interval = await conn.fetchval(
            "SELECT time_interval FROM timescaledb_information.dimensions "
            "WHERE hypertable_name = 'call_events' AND column_name = 'created_at'"
        )
        assert interval == timedelta(hours=6)
        st = await Migrator(conn, discover()).status()
        assert st.hypertable
        # The key holds the time column, so a repeated (id, created_at) is refused.
        cid = await conn.fetchval(
            "INSERT INTO calls (from_number, to_number) VALUES ('+15550001', '+15550002') "
            "RETURNING id"
        )
        eid = uuid.uuid4()
        insert = (
            "INSERT INTO call_events (id, call_id, event_type, event_data, created_at) "
            "VALUES ($1, $2, 'answer', '{}', '2026-01-01T00:00:00Z') ON CONFLICT DO NOTHING"
        )
        await conn.execute(insert, eid, cid)
        await conn.execute(insert, eid, cid)
        assert await conn.fetchval("SELECT count(*) FROM call_events") == 1
    finally:
        await conn.close()


async def test_without_timescaledb_call_events_stays_a_plain_table(postgres_empty_url):
    conn = await asyncpg.connect(postgres_empty_url)
    try:
        if await _timescaledb_loadable(conn):
            pytest.skip("the test server has timescaledb")
        await Migrator(conn, discover()).up()
        st = await Migrator(conn, discover()).status()
        assert (st.timescaledb, st.hypertable) == (False, False)
    finally:
        await conn.close()
