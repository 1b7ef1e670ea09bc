"""Shared fixtures: a throwaway database on a real PostgreSQL server, a real Kafka-protocol
broker (Tansu on a free port, or ``KAFKA_BOOTSTRAP_SERVERS``), fresh topics per test."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from ingest.tools.devbroker import TansuBroker, broker_or_env
from tests.support import Topics, create_topics, migrate

TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _with_db(url: str, name: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, f"/{name}", p.query, p.fragment))


async def _create_database(server_url: str, prefix: str) -> str:
    """A new empty database on the server of ``server_url``; its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return _with_db(server_url, name)


async def _drop_database(server_url: str, url: str) -> None:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path[1:]}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def database_url() -> AsyncIterator[str]:
    """A migrated database of its own for this test session, dropped at the end."""
    url = await _create_database(TEST_DATABASE_URL, "ingest_test")
    await migrate(url)
    yield url
    await _drop_database(TEST_DATABASE_URL, url)


@pytest_asyncio.fixture(loop_scope="session")
async def postgres_empty_url() -> AsyncIterator[str]:
    """A throwaway empty database (no migration) on the plain PostgreSQL test server."""
    url = await _create_database(TEST_DATABASE_URL, "ingest_empty")
    yield url
    await _drop_database(TEST_DATABASE_URL, url)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test database, for the tests' own queries."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def tansu() -> Iterator[TansuBroker | None]:
    """The session's own Tansu broker, or None when KAFKA_BOOTSTRAP_SERVERS names one."""
    with broker_or_env() as (_, broker):
        yield broker


@pytest.fixture(scope="session")
def kafka(tansu: TansuBroker | None) -> str:
    """Bootstrap address of a Kafka-protocol broker for this session."""
    return tansu.bootstrap if tansu is not None else os.environ["KAFKA_BOOTSTRAP_SERVERS"]


@pytest_asyncio.fixture(loop_scope="session")
async def topics(kafka: str) -> Topics:
    """A fresh source topic (4 partitions), dead-letter topic and group for one test."""
    t = Topics.fresh(kafka)
    await create_topics(kafka, {t.source: 4, t.dlq: 1})
    return t


# ------------------------------------------------------------------------- TimescaleDB

# A TimescaleDB server for the tests that need one: TIMESCALEDB_URL, else a local one on 5433.
TIMESCALEDB_URL = os.environ.get("TIMESCALEDB_URL", "postgresql://postgres@127.0.0.1:5433/postgres")


async def _timescaledb_admin() -> asyncpg.Connection:
    """A connection to the TimescaleDB server, or skip the test saying why there is none."""
    from ingest.service.settings import redact_url

    where = redact_url(TIMESCALEDB_URL)
    try:
        admin = await asyncpg.connect(TIMESCALEDB_URL, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.skip(f"no TimescaleDB reachable at {where} (set TIMESCALEDB_URL): {exc}")
    loadable = await admin.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') "
        "AND current_setting('shared_preload_libraries') ILIKE '%timescaledb%'"
    )
    if not loadable:
        await admin.close()
        pytest.skip(f"the server at {where} has no preloaded timescaledb extension")
    return admin


async def _timescale_database() -> str:
    name = f"ingest_tsdb_{uuid.uuid4().hex[:10]}"
    admin = await _timescaledb_admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return _with_db(TIMESCALEDB_URL, name)


async def _migrated_timescale_database() -> str:
    """A new database on the TimescaleDB server with every migration applied."""
    url = await _timescale_database()
    await migrate(url)
    return url


async def _drop_timescale_database(url: str) -> None:
    await _drop_database(TIMESCALEDB_URL, url)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def _timescale_drops() -> AsyncIterator[list[asyncio.Task[None]]]:
    """Drops of throwaway TimescaleDB databases, run while later tests go on (a drop takes
    seconds on a busy server) and awaited at the end of the session."""
    drops: list[asyncio.Task[None]] = []
    yield drops
    await asyncio.gather(*drops)


@pytest_asyncio.fixture(loop_scope="session")
async def timescale_empty_url(_timescale_drops: list[asyncio.Task[None]]) -> AsyncIterator[str]:
    """A throwaway empty database on the TimescaleDB server, dropped after the test."""
    url = await _timescale_database()
    yield url
    _timescale_drops.append(asyncio.create_task(_drop_timescale_database(url)))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def timescale_url() -> AsyncIterator[str]:
    """A database on the TimescaleDB server with every migration applied (default
    settings), shared by the session like ``database_url``: tests use their own calls."""
    url = await _migrated_timescale_database()
    yield url
    await _drop_timescale_database(url)
