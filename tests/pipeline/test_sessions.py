"""The worker's sessions on a real PostgreSQL server: the limits every session carries, what
the server does at each of them, and how a writer gives up a session whose flow froze
(BatchWriter through a proxy that black-holes flows: no FIN, no RST, nothing forwarded)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from ingest.pipeline.deadletter import DeadLetterPublisher
from ingest.pipeline.policy import Disposition, classify, is_retryable
from ingest.pipeline.sessions import APPLICATION_NAME, SessionLimits, open_pool
from ingest.pipeline.sink import BatchWriter, Item, SessionTimedOut
from ingest.service.settings import Settings
from tests.faults.pgproxy import AFTER_LOCK, FlowFreezer
from tests.support import Topics, consumed, initiation_then_responses

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


def settings(url: str, **env: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": url, "DATABASE_POOL_MIN": "1", **env})


@contextlib.asynccontextmanager
async def worker_pool(url: str, **env: str) -> AsyncIterator[asyncpg.Pool]:
    """The worker's own pool (``sessions.open_pool``) on ``url``."""
    pool = await open_pool(settings(url, **env))
    try:
        yield pool
    finally:
        pool.terminate()


@contextlib.asynccontextmanager
async def writer_on(
    pool: asyncpg.Pool, topics: Topics, **options: Any
) -> AsyncIterator[BatchWriter]:
    producer = AIOKafkaProducer(bootstrap_servers=topics.bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        yield BatchWriter(pool, topics.group, DeadLetterPublisher(producer, topics.dlq), **options)
    finally:
        await producer.stop()


def a_call(topic: str, offsets: range) -> list[Item]:
    """One call's records at ``offsets`` of partition 0: an initiation, then responses."""
    events = initiation_then_responses(uuid.uuid4(), len(offsets), T0)
    return consumed(topic, 0, iter(offsets), events)


async def positions_locked(db: asyncpg.Pool, group: str) -> bool:
    """Whether some transaction holds a lock on the group's stored positions."""
    async with db.acquire() as conn, conn.transaction():
        try:
            await conn.execute(
                "SELECT 1 FROM ingest_consumer_offsets WHERE consumer_group = $1 FOR UPDATE NOWAIT",
                group,
            )
        except asyncpg.LockNotAvailableError:
            return True
    return False


# --------------------------------------------------------------------------- the limits


async def test_every_session_carries_the_limits_and_keepalives_on_both_of_its_ends(
    database_url: str,
) -> None:
    env = {
        "INGEST_WRITE_TIMEOUT_S": "12",
        "DATABASE_LOCK_TIMEOUT": "3000",
        "DATABASE_KEEPALIVES_IDLE": "20",
        "DATABASE_KEEPALIVES_INTERVAL": "4",
        "DATABASE_KEEPALIVES_COUNT": "5",
        "DATABASE_TCP_USER_TIMEOUT": "40000",
    }
    wanted = SessionLimits.of(settings(database_url, **env))
    async with worker_pool(database_url, **env) as pool, pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
            list(wanted.server_settings()),
        )
        sock = conn._transport.get_extra_info("socket")
        on_socket = [
            (lvl, opt, sock.getsockopt(lvl, opt)) for lvl, opt, _ in wanted.socket_options()
        ]
    assert {r["name"]: r["setting"] for r in rows} == wanted.server_settings()
    assert on_socket == wanted.socket_options()


# Offsets, microseconds, both sides of 2000-01-01 (PostgreSQL's epoch), the range's ends.
WIRE_TIMES = [
    "2026-06-01T09:00:00.123456+00:00",
    "2026-06-01T11:00:00.000001+02:00",
    "2026-06-01T04:29:59.999999-04:30",
    "1999-12-31T23:59:59.999999+00:00",
    "2000-01-01T00:00:00+00:00",
    "0001-01-01T00:00:00+00:00",
    "9999-12-31T23:59:59.999999+00:00",
]


async def test_worker_sessions_send_and_read_timestamps_as_postgresql_parses_them(
    database_url: str,
) -> None:
    async with worker_pool(database_url) as pool, pool.acquire() as conn:
        for text in WIRE_TIMES:
            value = datetime.fromisoformat(text)
            same, back = await conn.fetchrow(
                "SELECT $1::timestamptz = $2::text::timestamptz, $2::text::timestamptz",
                value,
                text,
            )
            assert same, text
            assert back == value, text
            assert back.tzinfo is UTC, text
        arrays = await conn.fetchval(
            "SELECT array_agg(t) FROM unnest($1::timestamptz[]) AS t",
            [datetime.fromisoformat(t) for t in WIRE_TIMES],
        )
        assert arrays == [datetime.fromisoformat(t) for t in WIRE_TIMES]


async def test_worker_sessions_read_the_infinities_as_asyncpg_does(database_url: str) -> None:
    query = "SELECT 'infinity'::timestamptz, '-infinity'::timestamptz"
    plain = await asyncpg.connect(database_url)
    try:
        expected = tuple(await plain.fetchrow(query))
    finally:
        await plain.close()
    async with worker_pool(database_url) as pool, pool.acquire() as conn:
        assert tuple(await conn.fetchrow(query)) == expected


async def test_worker_sessions_refuse_a_naive_timestamp_rather_than_guess_its_zone(
    database_url: str,
) -> None:
    async with worker_pool(database_url) as pool, pool.acquire() as conn:
        with pytest.raises(asyncpg.DataError, match="offset-naive"):
            await conn.fetchval("SELECT $1::timestamptz", datetime(2026, 6, 1, 9, 0))


async def test_a_wait_for_the_positions_lock_past_the_lock_timeout_fails_as_transient(
    db: asyncpg.Pool, database_url: str
) -> None:
    group = f"locks-{uuid.uuid4().hex[:8]}"
    await db.execute(
        "INSERT INTO ingest_consumer_offsets (consumer_group, topic, partition, next_offset) "
        "VALUES ($1, 't', 0, 0)",
        group,
    )
    async with (
        worker_pool(database_url, DATABASE_LOCK_TIMEOUT="300") as pool,
        db.acquire() as holder,
        holder.transaction(),
    ):
        await holder.execute(
            "SELECT 1 FROM ingest_consumer_offsets WHERE consumer_group = $1 FOR UPDATE", group
        )
        async with pool.acquire() as conn:
            with pytest.raises(asyncpg.LockNotAvailableError) as info:
                await conn.execute(
                    "UPDATE ingest_consumer_offsets SET next_offset = 1 WHERE consumer_group = $1",
                    group,
                )
    assert classify(info.value) is Disposition.TRANSIENT


async def test_a_statement_past_the_write_timeout_is_cancelled_by_the_server_as_transient(
    database_url: str,
) -> None:
    async with (
        worker_pool(database_url, INGEST_WRITE_TIMEOUT_S="1") as pool,
        pool.acquire() as conn,
    ):
        with pytest.raises(asyncpg.QueryCanceledError) as info:
            # asyncpg's own bound of the statement is the same: lift it to see the server's.
            await conn.fetchval("SELECT pg_sleep(10)", timeout=30)
    assert classify(info.value) is Disposition.TRANSIENT


async def test_a_transaction_left_idle_past_the_write_timeout_is_ended_with_its_locks(
    db: asyncpg.Pool, database_url: str
) -> None:
    group = f"idle-{uuid.uuid4().hex[:8]}"
    await db.execute(
        "INSERT INTO ingest_consumer_offsets (consumer_group, topic, partition, next_offset) "
        "VALUES ($1, 't', 0, 0)",
        group,
    )
    async with worker_pool(database_url, INGEST_WRITE_TIMEOUT_S="1") as pool:
        conn = await pool.acquire()
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            "UPDATE ingest_consumer_offsets SET next_offset = 1 WHERE consumer_group = $1", group
        )
        assert await positions_locked(db, group)
        deadline = time.monotonic() + 30
        while await positions_locked(db, group):
            assert time.monotonic() < deadline, "the server never ended the idle transaction"
            await asyncio.sleep(0.1)
        # The server's FATAL closed the connection: asyncpg gave it back to the pool.
        with pytest.raises(asyncpg.InterfaceError) as info:
            await conn.fetchval("SELECT 1")
    assert classify(info.value) is Disposition.TRANSIENT
    assert is_retryable(info.value)
    assert (
        await db.fetchval(
            "SELECT next_offset FROM ingest_consumer_offsets WHERE consumer_group = $1", group
        )
        == 0
    )


# ------------------------------------------------------------------------ a frozen flow


async def test_a_write_frozen_inside_its_transaction_ends_its_session_and_frees_the_positions(
    db: asyncpg.Pool, database_url: str, topics: Topics
) -> None:
    # A plain pool: no server-side limit would end the frozen session; only the writer can.
    async with FlowFreezer(database_url, AFTER_LOCK) as proxy:
        pool = await asyncpg.create_pool(
            proxy.url(),
            min_size=1,
            max_size=2,
            server_settings={"application_name": APPLICATION_NAME},
        )
        try:
            async with writer_on(pool, topics, write_timeout_s=2) as writer:
                await writer.write(a_call(topics.source, range(0, 5)))
                proxy.arm()
                started = time.monotonic()
                with pytest.raises(SessionTimedOut):
                    await writer.write(a_call(topics.source, range(5, 10)))
                took = time.monotonic() - started
                assert proxy.frozen_at is not None
                assert not await positions_locked(db, topics.group)
                # And the next batch is stored, on a fresh connection.
                result = await writer.write(a_call(topics.source, range(5, 10)))
        finally:
            pool.terminate()
    assert 2 <= took < 2 + 8, took  # the time limit, then a bounded end of the session
    assert result.positions == {(topics.source, 0): 10}


async def test_a_session_frozen_with_every_flow_of_its_pool_is_ended_from_a_fresh_connection(
    db: asyncpg.Pool, database_url: str, topics: Topics
) -> None:
    # The pool hands out its open connections first: here, the two whose flows froze too.
    async with FlowFreezer(database_url, AFTER_LOCK) as proxy:
        pool = await asyncpg.create_pool(
            proxy.url(),
            min_size=3,
            max_size=3,
            server_settings={"application_name": APPLICATION_NAME},
        )
        try:
            async with writer_on(pool, topics, write_timeout_s=2) as writer:
                await writer.write(a_call(topics.source, range(0, 5)))
                proxy.arm()
                with pytest.raises(SessionTimedOut):
                    await writer.write(a_call(topics.source, range(5, 10)))
                assert proxy.frozen_flows == 3
                assert not await positions_locked(db, topics.group)
                result = await writer.write(a_call(topics.source, range(5, 10)))
        finally:
            pool.terminate()
    assert result.positions == {(topics.source, 0): 10}
