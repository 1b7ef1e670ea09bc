"""The lifecycle migration (0004): compression, retention and the hourly aggregate on
TimescaleDB; the same aggregate as a plain view on PostgreSQL; all of it undone by down."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import asyncpg
import pytest

from ingest.tools.migrate import (
    Migration,
    Migrator,
    discover,
    job_scheduler,
    pause_lifecycle_jobs,
)

LIFECYCLE = "0004"
# Reverting the lifecycle reverts what came after it too, newest first.
FROM_LIFECYCLE = sum(1 for m in discover() if m.version >= LIFECYCLE)

_JOBS = """
SELECT proc_name, config FROM timescaledb_information.jobs
WHERE hypertable_name IN ('call_events', 'call_events_hourly')
"""


async def _jobs(conn: asyncpg.Connection) -> dict[str, str]:
    return {r["proc_name"]: r["config"] for r in await conn.fetch(_JOBS)}


_SCHEDULED = """
SELECT proc_name, scheduled FROM timescaledb_information.jobs
WHERE hypertable_name IN ('call_events', 'call_events_hourly')
"""
# Records, from inside a migration's transaction, whether each policy job was scheduled.
_SEE_JOBS = f"CREATE TABLE jobs_seen AS {_SCHEDULED}"
_SEEN = "TABLE jobs_seen"


async def _scheduled(conn: asyncpg.Connection, query: str = _SCHEDULED) -> dict[str, bool]:
    """Whether each policy job is scheduled (``_SEEN``: was, inside the probe migration)."""
    return {r["proc_name"]: r["scheduled"] for r in await conn.fetch(query)}


# The jobs of the default settings (retention is off).
_DEFAULT_POLICIES = ("policy_compression", "policy_refresh_continuous_aggregate")


def _probe(up: str, down: str) -> Migration:
    """A migration after the shipped ones, for what a migration sees while it runs."""
    return Migration("9001", "probe", up, down, "probe")


async def _old_compressed_events(conn: asyncpg.Connection, n: int) -> None:
    """n events of one call 30 days ago, in a chunk that is then compressed."""
    call = await conn.fetchval(
        "INSERT INTO calls (from_number, to_number, created_at) "
        "VALUES ('+15550001', '+15550002', now() - interval '30 days') RETURNING id"
    )
    await conn.execute(
        "INSERT INTO call_events (call_id, event_type, event_data, created_at) "
        "SELECT $1, 'response', '{}', now() - interval '30 days' + g * interval '1 second' "
        "FROM generate_series(1, $2) g",
        call,
        n,
    )
    await conn.execute(
        "SELECT compress_chunk(c) FROM show_chunks('call_events', older_than => now() - "
        "interval '7 days') c"
    )


async def test_call_events_compress_by_time_with_bloom_filters_per_the_settings(
    timescale_empty_url: str,
) -> None:
    conn = await asyncpg.connect(timescale_empty_url)
    try:
        await Migrator(conn, discover(), compress_after="3 days", retention="40 days").up()
        settings = await conn.fetchrow(
            "SELECT segmentby, orderby, index::text FROM "
            "timescaledb_information.hypertable_columnstore_settings "
            "WHERE hypertable = 'call_events'::regclass"
        )
        assert settings["segmentby"] in (None, "")
        assert settings["orderby"] == "created_at DESC"
        assert '"bloom", "column": "call_id"' in settings["index"]
        assert '"bloom", "column": "id"' in settings["index"]
        jobs = await _jobs(conn)
        assert '"compress_after": "3 days"' in jobs["policy_compression"]
        assert '"drop_after": "40 days"' in jobs["policy_retention"]
        # The aggregate's refresh stays short of the retention: half of it, 30 days at most.
        assert '"start_offset": "20 days"' in jobs["policy_refresh_continuous_aggregate"]
    finally:
        await conn.close()


async def test_the_hourly_aggregate_keeps_hours_whose_chunks_retention_dropped(
    timescale_empty_url: str,
) -> None:
    conn = await asyncpg.connect(timescale_empty_url)
    try:
        await Migrator(conn, discover(), retention="10 days").up()
        # The test runs the policies itself; a scheduled run would race its steps.
        await pause_lifecycle_jobs(conn)
        call = await conn.fetchval(
            "INSERT INTO calls (from_number, to_number, created_at) "
            "VALUES ('+15550001', '+15550002', now() - interval '12 days') RETURNING id"
        )
        await conn.execute(
            "INSERT INTO call_events (call_id, event_type, event_data, created_at) "
            "SELECT $1, 'response', '{}', now() - g * interval '1 day' "
            "FROM generate_series(2, 12) g",
            call,
        )
        await conn.execute("CALL refresh_continuous_aggregate('call_events_hourly', NULL, NULL)")
        jobs = {
            r["proc_name"]: r["job_id"]
            for r in await conn.fetch(
                "SELECT proc_name, job_id FROM timescaledb_information.jobs "
                "WHERE proc_name IN ('policy_retention', 'policy_refresh_continuous_aggregate')"
            )
        }
        await conn.execute(f"CALL run_job({jobs['policy_retention']})")
        await conn.execute(f"CALL run_job({jobs['policy_refresh_continuous_aggregate']})")
        # A manual refresh of the policy's whole window (what docs/timescaledb.md suggests after
        # late events) must not reach the dropped hours either.
        window = await conn.fetchval(
            "SELECT (config ->> 'start_offset')::interval FROM timescaledb_information.jobs "
            "WHERE proc_name = 'policy_refresh_continuous_aggregate'"
        )
        await conn.execute(
            "CALL refresh_continuous_aggregate('call_events_hourly', "
            "now() - $1::interval, now() - interval '1 hour')",
            window,
        )
        assert await conn.fetchval("SELECT count(*) FROM call_events") < 11
        assert await conn.fetchval("SELECT sum(events) FROM call_events_hourly") == 11
    finally:
        await conn.close()


async def test_hourly_aggregate_is_continuous_real_time_and_refreshed_by_a_policy(
    timescale_url: str,
) -> None:
    conn = await asyncpg.connect(timescale_url)
    try:
        cagg = await conn.fetchrow(
            "SELECT materialized_only FROM timescaledb_information.continuous_aggregates "
            "WHERE view_name = 'call_events_hourly'"
        )
        assert cagg is not None
        assert cagg["materialized_only"] is False
        refresh = (await _jobs(conn))["policy_refresh_continuous_aggregate"]
        assert '"end_offset": "01:00:00"' in refresh
        assert '"start_offset": "30 days"' in refresh
    finally:
        await conn.close()


async def test_down_removes_policies_aggregate_and_compression_and_keeps_the_events(
    timescale_empty_url: str,
) -> None:
    conn = await asyncpg.connect(timescale_empty_url)
    try:
        await Migrator(conn, discover()).up()
        # No pause here: a policy's scheduled run racing down's DDL failed it once with
        # "tuple concurrently updated"; the migrator now keeps the jobs still itself.
        await _old_compressed_events(conn, 50)
        undone = await Migrator(conn, discover()).down(steps=FROM_LIFECYCLE)
        assert [m.version for m in undone][-1] == LIFECYCLE
        assert await _jobs(conn) == {}
        assert await conn.fetchval("SELECT to_regclass('call_events_hourly')") is None
        assert not await conn.fetchval(
            "SELECT compression_enabled FROM timescaledb_information.hypertables "
            "WHERE hypertable_name = 'call_events'"
        )
        assert await conn.fetchval("SELECT count(*) FROM call_events") == 50
        # ... and up again restores all of it.
        await Migrator(conn, discover()).up()
        assert set(await _jobs(conn)) == {
            "policy_compression",
            "policy_refresh_continuous_aggregate",
        }
    finally:
        await conn.close()


def test_cli_status_shows_the_lifecycle(timescale_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ingest", "migrate", "status"],
        env={**os.environ, "DATABASE_URL": timescale_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    # The session's TimescaleDB database is shared: other tests' chunks may be there.
    assert re.search(
        r"compression: after 7 days \(\d+ of \d+ chunks compressed\); retention: off", out
    ), out
    assert (
        "aggregate: call_events_hourly (continuous aggregate, refreshed every 00:15:00, "
        "real-time)" in out
    )
    assert re.search(r"^policy jobs: .*\(background workers \d+ of \d+ in use", out, re.M), out


async def test_status_says_when_no_scheduler_runs_the_policy_jobs(
    timescale_empty_url: str,
) -> None:
    conn = await asyncpg.connect(timescale_empty_url)
    try:
        await Migrator(conn, discover()).up()
        # What a database gets when the server's background workers are all taken.
        await conn.execute("SELECT _timescaledb_functions.stop_background_workers()")
        scheduler = (await Migrator(conn, discover()).status()).lifecycle.scheduler
        assert scheduler is not None
        assert not scheduler.running
        assert scheduler.describe().startswith("policy jobs: NOT RUNNING")
    finally:
        await conn.close()


async def test_status_says_when_the_scheduler_runs_the_policy_jobs(
    timescale_empty_url: str,
) -> None:
    conn = await asyncpg.connect(timescale_empty_url)
    try:
        await Migrator(conn, discover()).up()
        await _scheduler_with_a_worker_free(conn)
        scheduler = (await Migrator(conn, discover()).status()).lifecycle.scheduler
        assert scheduler is not None
        assert scheduler.running
    finally:
        await conn.close()


async def test_on_plain_postgresql_the_hourly_aggregate_is_a_view_down_removes(
    postgres_empty_url: str,
) -> None:
    conn = await asyncpg.connect(postgres_empty_url)
    try:
        if await conn.fetchval(
            "SELECT count(*) > 0 FROM pg_extension WHERE extname = 'timescaledb' "
            "OR current_setting('shared_preload_libraries') ILIKE '%timescaledb%'"
        ):
            pytest.skip("the PostgreSQL test server has timescaledb")
        m = Migrator(conn, discover())
        await m.up()
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pg_views WHERE viewname = 'call_events_hourly'"
            )
            == 1
        )
        st = await m.status()
        assert [a.name for a in st.lifecycle.aggregates] == ["call_events_hourly"]
        await m.down(steps=FROM_LIFECYCLE)
        assert await conn.fetchval("SELECT to_regclass('call_events_hourly')") is None
        assert await conn.fetchval("SELECT to_regclass('idx_call_events_hour')") is None
    finally:
        await conn.close()


async def test_a_migration_runs_with_the_policy_jobs_unscheduled_and_they_run_again_after(
    timescale_empty_url: str,
) -> None:
    conn = await asyncpg.connect(timescale_empty_url)
    try:
        await Migrator(conn, discover()).up()
        await Migrator(conn, [*discover(), _probe(_SEE_JOBS, "DROP TABLE jobs_seen")]).up()
        assert await _scheduled(conn, _SEEN) == dict.fromkeys(_DEFAULT_POLICIES, False)
        assert await _scheduled(conn) == dict.fromkeys(_DEFAULT_POLICIES, True)
    finally:
        await conn.close()


async def test_a_down_migration_runs_with_the_policy_jobs_unscheduled(
    timescale_empty_url: str,
) -> None:
    conn = await asyncpg.connect(timescale_empty_url)
    try:
        migrations = [*discover(), _probe("SELECT 1", _SEE_JOBS)]
        await Migrator(conn, migrations).up()
        await Migrator(conn, migrations).down(steps=1)
        assert await _scheduled(conn, _SEEN) == dict.fromkeys(_DEFAULT_POLICIES, False)
        assert await _scheduled(conn) == dict.fromkeys(_DEFAULT_POLICIES, True)
    finally:
        await conn.close()


async def test_the_policy_jobs_run_again_after_a_migration_that_failed(
    timescale_empty_url: str,
) -> None:
    conn = await asyncpg.connect(timescale_empty_url)
    try:
        await Migrator(conn, discover()).up()
        with pytest.raises(asyncpg.DivisionByZeroError):
            await Migrator(conn, [*discover(), _probe("SELECT 1 / 0", "SELECT 1")]).up()
        assert await _scheduled(conn) == dict.fromkeys(_DEFAULT_POLICIES, True)
    finally:
        await conn.close()


async def test_a_policy_job_the_operator_unscheduled_stays_unscheduled_after_a_migration(
    timescale_empty_url: str,
) -> None:
    conn = await asyncpg.connect(timescale_empty_url)
    try:
        await Migrator(conn, discover()).up()
        await conn.execute(
            "SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs "
            "WHERE proc_name = 'policy_compression'"
        )
        await Migrator(conn, [*discover(), _probe("SELECT 1", "SELECT 1")]).up()
        assert await _scheduled(conn) == {
            "policy_compression": False,
            "policy_refresh_continuous_aggregate": True,
        }
    finally:
        await conn.close()


async def _scheduler_with_a_worker_free(conn: asyncpg.Connection, wait_s: float = 30) -> None:
    """Wait until TimescaleDB's scheduler runs for this database with a background worker
    free for a job run; skip the test, saying why, when the server has none to give (its
    pool, max_worker_processes, taken by other databases' schedulers: each database with the
    extension keeps one, and a new database gets none until one is free)."""
    deadline = time.monotonic() + wait_s
    while not (s := await job_scheduler(conn)).running or s.workers_in_use >= s.max_workers:
        if time.monotonic() > deadline:
            pytest.skip(f"the TimescaleDB server runs no jobs for a new database: {s.describe()}")
        await asyncio.sleep(0.2)


async def _refresh_run_under_way(conn: asyncpg.Connection, blocker: asyncpg.Connection) -> int:
    """Start the aggregate's refresh policy now and keep it running: ``blocker`` holds an
    exclusive lock on call_events (its transaction must be open) that the refresh waits for.
    Returns the job's id once TimescaleDB reports it running."""
    await blocker.execute("LOCK TABLE call_events IN ACCESS EXCLUSIVE MODE")
    job = await conn.fetchval(
        "SELECT job_id FROM timescaledb_information.jobs "
        "WHERE proc_name = 'policy_refresh_continuous_aggregate'"
    )
    await conn.execute("SELECT alter_job($1, next_start => now())", job)
    # Running, and waiting for the lock: a run begun before it (the policy's first, right
    # after the migration) may still read as running for a moment after it ended.
    deadline = time.monotonic() + 60
    while not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM timescaledb_information.job_stats "
        "               WHERE job_id = $1 AND job_status = 'Running') "
        "AND EXISTS (SELECT 1 FROM pg_locks "
        "            WHERE relation = 'call_events'::regclass AND NOT granted)",
        job,
    ):
        assert time.monotonic() < deadline, "the refresh policy did not start within 60 s"
        await asyncio.sleep(0.2)
    return int(job)


async def test_a_migration_starts_once_a_policy_run_under_way_has_stopped(
    timescale_empty_url: str,
) -> None:
    conn = await asyncpg.connect(timescale_empty_url)
    blocker = await asyncpg.connect(timescale_empty_url)
    try:
        await Migrator(conn, discover()).up()
        await _scheduler_with_a_worker_free(conn)
        async with blocker.transaction():
            job = await _refresh_run_under_way(conn, blocker)
            # Unscheduled, the run is stopped by TimescaleDB's scheduler, lock wait or not.
            seen = (
                "CREATE TABLE job_seen AS SELECT job_status "
                f"FROM timescaledb_information.job_stats WHERE job_id = {job}"
            )
            await Migrator(conn, [*discover(), _probe(seen, "SELECT 1")]).up()
            assert await conn.fetchval("SELECT job_status FROM job_seen") != "Running"
            assert await _scheduled(conn) == dict.fromkeys(_DEFAULT_POLICIES, True)
    finally:
        await blocker.close()
        await conn.close()
