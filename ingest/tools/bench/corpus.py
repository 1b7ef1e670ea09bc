"""The benchmark's corpus and setup: the events, the database, the topic, the preload."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ingest.service.settings import redact_url
from ingest.tools.bench.history import migrate_without_policy_runs, remove_corpus
from ingest.tools.devbroker import fresh_local_database
from ingest.tools.produce import interleave

PARTITIONS = 4
# The corpus starts at today's midnight (UTC) and the history ends there: like a live
# platform, the last day of history is yesterday, so the shipped queries' "last 24 hours"
# and the compression horizon (chunks older than 7 days) mean what they mean in production.
START = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
# The ceilings store a corpus of the same shape with other ids (another seed).
CEILING_SEED_OFFSET = 7919


# How far back a repeat reaches, in events published: past a whole batch of every lane, so
# that the copy finds its original stored (a repeat within one batch is the other case).
REPEAT_LAG = 20_000


def events(n: int, seed: int, start: datetime = START) -> Iterator[dict[str, Any]]:
    """The benchmark's N events: realistic interleaved calls, always the same for a seed."""
    return itertools.islice(interleave(random.Random(seed), n, start=start), n)


def with_repeats(
    corpus: Iterable[dict[str, Any]], every: int, lag: int
) -> Iterator[dict[str, Any]]:
    """``corpus``, and after every ``every``-th event a copy of the event ``lag`` before it
    (a producer's retry of an event it had already published); none with ``every`` 0."""
    recent: deque[dict[str, Any]] = deque(maxlen=lag + 1)
    for i, e in enumerate(corpus, 1):
        yield e
        recent.append(e)
        if every and i % every == 0 and len(recent) > lag:
            yield recent[0]


@dataclass(frozen=True, slots=True)
class Target:
    """A database the bench writes into: empty tables, or history before ``START``."""

    url: str
    history: bool = False


async def bench_database(url: str | None, server_url: str) -> tuple[str, bool]:
    """A migrated database for the empty-table runs: ``url`` when given, else a fresh one of
    this process on the server of ``server_url``. Returns (url, created here)."""
    created = url is None
    if url is None:
        url = await fresh_local_database(f"ingest_bench_{os.getpid()}", server_url)
    conn = await asyncpg.connect(url)
    try:
        await migrate_without_policy_runs(conn)
    finally:
        await conn.close()
    return url, created


async def drop_database(server_url: str, url: str) -> None:
    """Drop the database of ``url`` (one this run created)."""
    name = urlsplit(url).path.lstrip("/")
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def clean(target: Target) -> None:
    """Remove what earlier runs stored, so every run stores the same events anew: all of
    it on empty tables; on a history database only what lies at or after ``START``."""
    if target.history:
        await remove_corpus(target.url, START)
        return
    conn = await asyncpg.connect(target.url)
    try:
        await conn.execute("TRUNCATE call_events, calls, ingest_consumer_offsets")
        await conn.execute("VACUUM ANALYZE calls")
    finally:
        await conn.close()


async def create_topic(bootstrap: str, name: str, partitions: int = PARTITIONS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, num_partitions=partitions, replication_factor=1),
                NewTopic(f"{name}.dlq", num_partitions=1, replication_factor=1),
            ]
        )
    finally:
        await admin.close()


async def preload(
    bootstrap: str, topic: str, n: int, seed: int, repeat_every: int = 0
) -> tuple[dict[int, int], int]:
    """Publish the N events (with ``with_repeats``'s copies: ``repeat_every``); return the
    end offset per partition and how many copies were published."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        max_batch_size=512 * 1024,
        enable_idempotence=False,
    )
    await producer.start()
    ends: dict[int, int] = {}
    published = 0
    try:
        pending: list[asyncio.Future[Any]] = []
        for e in with_repeats(events(n, seed), repeat_every, min(REPEAT_LAG, n // 2)):
            published += 1
            pending.append(await producer.send(topic, orjson.dumps(e), key=e["call_id"].encode()))
            if len(pending) >= 10_000:
                for md in await asyncio.gather(*pending):
                    ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
                pending.clear()
        for md in await asyncio.gather(*pending):
            ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    finally:
        await producer.stop()
    return ends, published - n


async def check_exactly_once(conn: asyncpg.Connection, n: int) -> None:
    """Fail unless every one of the corpus' n events is stored exactly once. Only the
    corpus' time range is counted (history lies before it), and the time bound also lets
    TimescaleDB skip the old chunks."""
    total, distinct = await conn.fetchrow(
        "SELECT count(*), count(DISTINCT id) FROM call_events WHERE created_at >= $1", START
    )
    if total != n or distinct != n:
        raise SystemExit(
            f"bench: correctness check failed: {total} rows, {distinct} ids, {n} events published"
        )


async def server_version(url: str) -> tuple[str, str]:
    """("PostgreSQL", "15.20") or ("TimescaleDB", "2.26.4 on PostgreSQL 15.20")."""
    conn = await asyncpg.connect(url)
    try:
        pg = await conn.fetchval("SHOW server_version")
        tsdb = await conn.fetchval(
            "SELECT coalesce(installed_version, default_version) FROM pg_available_extensions "
            "WHERE name = 'timescaledb'"
        )
    finally:
        await conn.close()
    pg = str(pg).split(" ", 1)[0]
    return ("TimescaleDB", f"{tsdb} on PostgreSQL {pg}") if tsdb else ("PostgreSQL", pg)


async def unreachable(url: str) -> str:
    """Why the server of ``url`` cannot be used; empty when it answers."""
    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return f"cannot connect to {redact_url(url)}: {type(exc).__name__}: {redact_url(str(exc))}"
    await conn.close()
    return ""
