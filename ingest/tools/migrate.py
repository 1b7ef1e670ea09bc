"""Schema migrations: ordered SQL files with an up and a down part (``schema/migrations``).

A small runner rather than a library: the maintained Python ones (alembic, yoyo) need
SQLAlchemy or a DB-API driver, and this project speaks asyncpg only. Each migration runs
in its own transaction and is recorded in ``ingest_schema_migrations``; a session-level
advisory lock makes concurrent ``up`` runs (several replicas starting) take turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

import asyncpg

# Any fixed 64-bit number; it names this runner's lock among the database's advisory locks.
ADVISORY_LOCK_KEY: Final = 0x1D6E57_4D16
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_UP = "-- migrate:up"
_DOWN = "-- migrate:down"

# Catalog reads only: cheap however much data call_events holds.
_POLICIES = """
SELECT proc_name, config ->> 'compress_after' AS compress_after,
       config ->> 'drop_after' AS drop_after
FROM timescaledb_information.jobs
WHERE hypertable_schema = current_schema() AND hypertable_name = 'call_events'
  AND proc_name IN ('policy_compression', 'policy_retention')
"""
_CHUNKS = """
SELECT count(*) AS chunks, count(*) FILTER (WHERE is_compressed) AS compressed
FROM timescaledb_information.chunks
WHERE hypertable_schema = current_schema() AND hypertable_name = 'call_events'
"""
_CONTINUOUS_AGGREGATES = """
SELECT a.view_name, NOT a.materialized_only AS real_time, j.schedule_interval::text AS every
FROM timescaledb_information.continuous_aggregates a
LEFT JOIN timescaledb_information.jobs j
       ON j.proc_name = 'policy_refresh_continuous_aggregate'
      AND j.hypertable_schema = a.view_schema
      AND j.hypertable_name = a.view_name
WHERE a.view_schema = current_schema() AND a.hypertable_name = 'call_events'
ORDER BY a.view_name
"""
_VIEWS = """
SELECT viewname FROM pg_views
WHERE schemaname = current_schema() AND viewname = 'call_events_hourly'
"""

# The scheduled jobs of call_events and of its aggregate (0004's policies), by id.
_LIFECYCLE_JOBS = """
SELECT job_id FROM timescaledb_information.jobs
WHERE hypertable_schema = current_schema()
  AND hypertable_name IN ('call_events', 'call_events_hourly') AND scheduled
"""
_RUNNING_JOBS = """
SELECT EXISTS (SELECT 1 FROM timescaledb_information.job_stats
               WHERE job_id = ANY($1::int[]) AND job_status = 'Running')
"""
_SCHEDULE_JOBS = """
SELECT alter_job(j.job_id, scheduled => $2)
FROM timescaledb_information.jobs j WHERE j.job_id = ANY($1::int[])
"""
# How long a migration waits for a policy run under way to stop before it gives up and
# changes nothing. Unscheduling a job makes TimescaleDB's scheduler cancel its run (SIGINT,
# SIGTERM after 3 s): its work rolls back, and the job's next run does it again.
JOBS_WAIT_S: Final = 300.0

_HAS_JOBS_VIEW = "SELECT to_regclass('timescaledb_information.jobs') IS NOT NULL"

# TimescaleDB runs a database's policy jobs from a scheduler of its own, a background
# worker, and each run in one more. Background workers come from one pool of the server
# (max_worker_processes: every database's scheduler, job runs, parallel queries, logical
# replication): with the pool used up, a database gets no scheduler, and its compression,
# retention and refreshes silently never run. What counts against the pool is every process
# but the client backends and the server's own auxiliary processes.
_SCHEDULER = """
SELECT EXISTS (SELECT 1 FROM pg_stat_activity
               WHERE datname = current_database()
                 AND backend_type = 'TimescaleDB Background Worker Scheduler') AS running,
       (SELECT count(*) FROM pg_stat_activity
        WHERE backend_type NOT IN ('client backend', 'autovacuum launcher',
                                   'autovacuum worker', 'background writer', 'checkpointer',
                                   'walwriter', 'archiver', 'startup', 'walreceiver',
                                   'walsender', 'standalone backend')) AS workers_in_use,
       current_setting('max_worker_processes')::int AS max_workers
"""

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS ingest_schema_migrations (
    version TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
)
"""


class MigrationError(Exception):
    """A migration file is malformed, or the database disagrees with the files."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file, split into its two parts."""

    version: str
    name: str
    up: str
    down: str
    checksum: str


@dataclass(frozen=True, slots=True)
class MigrationState:
    """One line of ``migrate status``."""

    version: str
    name: str
    applied_at: datetime | None
    changed: bool


@dataclass(frozen=True, slots=True)
class Aggregate:
    """One relation the analytics read: a continuous aggregate or (plain PostgreSQL) a view."""

    name: str
    continuous: bool
    real_time: bool = False
    refresh_every: str | None = None


@dataclass(frozen=True, slots=True)
class JobScheduler:
    """Whether TimescaleDB's job scheduler runs for this database, and the server's pool of
    background workers it (and each job run) needs a place in."""

    running: bool
    workers_in_use: int
    max_workers: int

    def describe(self) -> str:
        """One line for ``migrate status``."""
        pool = f"background workers {self.workers_in_use} of {self.max_workers} in use"
        if self.running:
            return f"policy jobs: TimescaleDB's scheduler runs for this database ({pool})"
        return (
            "policy jobs: NOT RUNNING: TimescaleDB runs no scheduler for this database "
            f"({pool}); compression, retention and refreshes wait until one starts: raise "
            "max_worker_processes (and timescaledb.max_background_workers) or free workers"
        )


async def job_scheduler(conn: asyncpg.Connection) -> JobScheduler:
    """The state of TimescaleDB's job scheduler for the database of ``conn``."""
    row = await conn.fetchrow(_SCHEDULER)
    assert row is not None
    return JobScheduler(bool(row["running"]), int(row["workers_in_use"]), int(row["max_workers"]))


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """The data lifecycle of call_events as configured in the database (see 0004)."""

    compress_after: str | None = None
    retention: str | None = None
    chunks: int = 0
    compressed_chunks: int = 0
    aggregates: list[Aggregate] = field(default_factory=list)
    # None on plain PostgreSQL.
    scheduler: JobScheduler | None = None


@dataclass(frozen=True, slots=True)
class Status:
    """What ``migrate status`` reports."""

    migrations: list[MigrationState]
    timescaledb: bool
    hypertable: bool
    lifecycle: Lifecycle = field(default_factory=Lifecycle)


async def pause_lifecycle_jobs(conn: asyncpg.Connection, wait_s: float = JOBS_WAIT_S) -> list[int]:
    """Unschedule the scheduled policy jobs of call_events and of its aggregate, and wait
    until a run under way has stopped (TimescaleDB's scheduler cancels it); return the jobs
    unscheduled (none without TimescaleDB).

    Raises ``MigrationError`` when a run goes on past ``wait_s``, after scheduling the jobs
    again: then nothing was changed."""
    if not await conn.fetchval(_HAS_JOBS_VIEW):
        return []
    jobs = [r["job_id"] for r in await conn.fetch(_LIFECYCLE_JOBS)]
    if not jobs:
        return jobs
    await conn.execute(_SCHEDULE_JOBS, jobs, False)
    deadline = time.monotonic() + wait_s
    while await conn.fetchval(_RUNNING_JOBS, jobs):
        if time.monotonic() > deadline:
            await conn.execute(_SCHEDULE_JOBS, jobs, True)
            raise MigrationError(
                f"a TimescaleDB policy job on call_events still runs after {wait_s:.0f} s; "
                "nothing was changed, try again later"
            )
        await asyncio.sleep(0.2)
    return jobs


def schema_dir() -> Path:
    """Where the migration files are: inside an installed package, or in the source tree."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_schema", package.parent / "schema"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise MigrationError("schema/migrations not found beside the ingest package")


def parse(path: Path) -> Migration:
    """Read one migration file; it must hold ``-- migrate:up`` then ``-- migrate:down``."""
    m = _NAME.match(path.name)
    if not m:
        raise MigrationError(f"{path.name}: name must look like 0001_some_name.sql")
    text = path.read_text(encoding="utf-8")
    up_at, down_at = text.find(_UP), text.find(_DOWN)
    if up_at < 0 or down_at < up_at:
        raise MigrationError(f"{path.name}: needs '{_UP}' followed by '{_DOWN}'")
    return Migration(
        version=m.group(1),
        name=m.group(2),
        up=text[up_at + len(_UP) : down_at].strip(),
        down=text[down_at + len(_DOWN) :].strip(),
        checksum=hashlib.sha256(text.encode()).hexdigest(),
    )


def discover(directory: Path | None = None) -> list[Migration]:
    """All migrations, in version order; versions must be unique."""
    d = (directory or schema_dir()) / "migrations"
    found = [parse(p) for p in sorted(d.glob("*.sql"))]
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return found


class Migrator:
    """Applies, reverts and reports migrations over one connection."""

    def __init__(
        self,
        conn: asyncpg.Connection,
        migrations: list[Migration],
        chunk_interval: str = "1 day",
        readonly_password: str | None = None,
        *,
        compress_after: str = "7 days",
        retention: str = "off",
    ) -> None:
        self._conn = conn
        self._migrations = migrations
        self._chunk_interval = chunk_interval
        self._readonly_password = readonly_password
        self._compress_after = compress_after
        self._retention = retention

    async def _applied(self) -> dict[str, tuple[str, datetime]]:
        await self._conn.execute(_CREATE_TABLE)
        rows = await self._conn.fetch(
            "SELECT version, checksum, applied_at FROM ingest_schema_migrations"
        )
        return {r["version"]: (r["checksum"], r["applied_at"]) for r in rows}

    async def _locked(self) -> None:
        await self._conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)

    async def _unlock(self) -> None:
        await self._conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)

    @contextlib.asynccontextmanager
    async def _jobs_paused(self) -> AsyncIterator[None]:
        """Keep TimescaleDB's policy jobs on call_events from running during migrations.

        A scheduled policy run that overlaps a migration's DDL on the same catalog rows
        fails it ("tuple concurrently updated"). Afterwards the jobs that still exist are
        scheduled again, whether the migrations succeeded or not (those a down removed are
        gone); a job that was unscheduled before stays so."""
        jobs = await pause_lifecycle_jobs(self._conn)
        try:
            yield
        finally:
            if jobs:
                await self._conn.execute(_SCHEDULE_JOBS, jobs, True)

    async def up(self, target: str | None = None) -> list[Migration]:
        """Apply every pending migration (up to ``target``); return those applied."""
        await self._locked()
        try:
            applied = await self._applied()
            pending = [
                m
                for m in self._migrations
                if m.version not in applied and (target is None or m.version <= target)
            ]
            if not pending:
                return []
            async with self._jobs_paused():
                for m in pending:
                    await self._apply(m)
            return pending
        finally:
            await self._unlock()

    async def _apply(self, m: Migration) -> None:
        async with self._conn.transaction():
            # Settings reach the SQL as transaction-local parameters, never as literals.
            await self._conn.execute(
                "SELECT set_config('ingest.chunk_interval', $1, true), "
                "set_config('ingest.readonly_password', $2, true), "
                "set_config('ingest.compress_after', $3, true), "
                "set_config('ingest.retention', $4, true)",
                self._chunk_interval,
                self._readonly_password or "",
                self._compress_after,
                self._retention,
            )
            await self._conn.execute(m.up)
            await self._conn.execute(
                "INSERT INTO ingest_schema_migrations (version, name, checksum) "
                "VALUES ($1, $2, $3)",
                m.version,
                m.name,
                m.checksum,
            )

    async def down(self, steps: int = 1) -> list[Migration]:
        """Revert the last ``steps`` applied migrations, newest first; return those reverted."""
        await self._locked()
        try:
            applied = await self._applied()
            by_version = {m.version: m for m in self._migrations}
            versions = sorted(applied, reverse=True)[:steps]
            missing = [v for v in versions if v not in by_version]
            if missing:
                raise MigrationError(f"applied migration {missing[0]} has no file to revert it")
            undone: list[Migration] = []
            if not versions:
                return undone
            async with self._jobs_paused():
                for version in versions:
                    m = by_version[version]
                    async with self._conn.transaction():
                        await self._conn.execute(m.down)
                        await self._conn.execute(
                            "DELETE FROM ingest_schema_migrations WHERE version = $1", version
                        )
                    undone.append(m)
            return undone
        finally:
            await self._unlock()

    async def status(self) -> Status:
        """Applied and pending migrations, and whether call_events is a hypertable."""
        applied = await self._applied()
        states = [
            MigrationState(
                m.version,
                m.name,
                applied[m.version][1] if m.version in applied else None,
                m.version in applied and applied[m.version][0] != m.checksum,
            )
            for m in self._migrations
        ]
        tsdb = bool(
            await self._conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
            )
        )
        hyper = False
        if tsdb:
            hyper = bool(
                await self._conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables "
                    "WHERE hypertable_name = 'call_events')"
                )
            )
        lifecycle = await self._lifecycle() if hyper else await self._views()
        return Status(states, tsdb, hyper, lifecycle)

    async def _lifecycle(self) -> Lifecycle:
        policies = await self._conn.fetch(_POLICIES)
        chunks = await self._conn.fetchrow(_CHUNKS)
        aggregates = await self._conn.fetch(_CONTINUOUS_AGGREGATES)
        return Lifecycle(
            compress_after=next(
                (p["compress_after"] for p in policies if p["proc_name"] == "policy_compression"),
                None,
            ),
            retention=next(
                (p["drop_after"] for p in policies if p["proc_name"] == "policy_retention"), None
            ),
            chunks=chunks["chunks"] if chunks else 0,
            compressed_chunks=chunks["compressed"] if chunks else 0,
            aggregates=[
                Aggregate(a["view_name"], True, bool(a["real_time"]), a["every"])
                for a in aggregates
            ],
            scheduler=await job_scheduler(self._conn),
        )

    async def _views(self) -> Lifecycle:
        return Lifecycle(
            aggregates=[Aggregate(r["viewname"], False) for r in await self._conn.fetch(_VIEWS)]
        )


def create(name: str, directory: Path | None = None) -> Path:
    """Write an empty migration file with the next version number; return its path."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not slug:
        raise MigrationError("a migration needs a name of letters or digits")
    d = (directory or schema_dir()) / "migrations"
    existing = discover(d.parent)
    version = f"{(int(existing[-1].version) + 1) if existing else 1:04d}"
    path = d / f"{version}_{slug}.sql"
    path.write_text(f"-- {name}\n\n{_UP}\n\n{_DOWN}\n", encoding="utf-8")
    return path
