"""The benchmark's corpus and setup: the events, the database, the topic, the preload."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ingest.tools.devbroker import fresh_local_database
from ingest.tools.migrate import Migrator, discover
from ingest.tools.produce import interleave

PARTITIONS = 4
BENCH_DB = "ingest_bench"
START = datetime(2026, 1, 1, tzinfo=UTC)


def events(n: int, seed: int, start: datetime = START) -> Iterator[dict[str, Any]]:
    """The benchmark's N events: realistic interleaved calls, always the same for a seed."""
    return itertools.islice(interleave(random.Random(seed), n, start=start), n)


async def bench_database(url: str | None) -> str:
    """A fresh, migrated benchmark database (or the given one, migrated)."""
    if url is None:
        url = await fresh_local_database(BENCH_DB)
    conn = await asyncpg.connect(url)
    try:
        await Migrator(conn, discover()).up()
    finally:
        await conn.close()
    return url


async def clean(url: str) -> None:
    """Empty the tables the runs write, so every run stores the same events anew."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE call_events, calls, ingest_consumer_offsets")
        await conn.execute("VACUUM ANALYZE calls")
    finally:
        await conn.close()


async def create_topic(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, num_partitions=PARTITIONS, replication_factor=1),
                NewTopic(f"{name}.dlq", num_partitions=1, replication_factor=1),
            ]
        )
    finally:
        await admin.close()


async def preload(bootstrap: str, topic: str, n: int, seed: int) -> dict[int, int]:
    """Publish the N events; return the end offset per partition."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        max_batch_size=512 * 1024,
        enable_idempotence=False,
    )
    await producer.start()
    ends: dict[int, int] = {}
    try:
        pending: list[asyncio.Future[Any]] = []
        for e in events(n, seed):
            pending.append(await producer.send(topic, orjson.dumps(e), key=e["call_id"].encode()))
            if len(pending) >= 10_000:
                for md in await asyncio.gather(*pending):
                    ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
                pending.clear()
        for md in await asyncio.gather(*pending):
            ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    finally:
        await producer.stop()
    return ends


async def check_exactly_once(conn: asyncpg.Connection, n: int) -> None:
    """Fail unless every one of the n events is stored exactly once."""
    total, distinct = await conn.fetchrow("SELECT count(*), count(DISTINCT id) FROM call_events")
    if total != n or distinct != n:
        raise SystemExit(
            f"bench: correctness check failed: {total} rows, {distinct} ids, {n} events published"
        )
