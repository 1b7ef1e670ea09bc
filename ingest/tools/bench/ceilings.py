"""The ceilings: what the database and the broker do for the same outcome with no worker."""

from __future__ import annotations

import itertools
import time
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from ingest.tools.bench.corpus import (
    CEILING_SEED_OFFSET,
    PARTITIONS,
    Target,
    check_exactly_once,
    clean,
    events,
)


def prepared_batches(n: int, seed: int, batch: int) -> list[tuple[list[Any], list[Any], list[Any]]]:
    """Rows in memory, per batch: new calls, events, terminations."""
    out = []
    it = events(n, seed)
    while chunk := list(itertools.islice(it, batch)):
        calls, rows, terms = [], [], []
        for e in chunk:
            ts = datetime.fromisoformat(e["created_at"])
            cid = e["call_id"]
            data = e["event_data"]
            if e["event_type"] == "initiation":
                calls.append((cid, data["from_number"], data["to_number"], ts, ts))
            elif e["event_type"] == "termination":
                terms.append((cid, data.get("status", "completed"), ts, data.get("cost_cents")))
            rows.append((e["id"], cid, e["event_type"], orjson.dumps(data).decode(), ts))
        out.append((calls, rows, terms))
    return out


_TERMINATE = """
UPDATE calls AS c SET status = t.status, ended_at = t.ended_at,
    duration = t.ended_at - c.created_at, cost_cents = t.cost_cents, updated_at = now()
FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::int4[])
     AS t(id, status, ended_at, cost_cents)
WHERE c.id = t.id AND c.ended_at IS NULL
"""


async def database_ceiling(target: Target, n: int, seed: int, batch: int) -> float:
    """Events/s of the minimal database work for the same outcome (a corpus of the same
    shape with other ids than the drains', from the same start)."""
    batches = prepared_batches(n, seed + CEILING_SEED_OFFSET, batch)
    await clean(target)
    conn = await asyncpg.connect(target.url)
    try:
        started = time.perf_counter()
        for calls, rows, terms in batches:
            async with conn.transaction():
                if calls:
                    await conn.copy_records_to_table(
                        "calls",
                        records=calls,
                        columns=("id", "from_number", "to_number", "created_at", "updated_at"),
                    )
                await conn.copy_records_to_table(
                    "call_events",
                    records=rows,
                    columns=("id", "call_id", "event_type", "event_data", "created_at"),
                )
                if terms:
                    await conn.execute(_TERMINATE, *map(list, zip(*terms, strict=True)))
        took = time.perf_counter() - started
        await check_exactly_once(conn, n)
    finally:
        await conn.close()
    return n / took


async def read_ceiling(bootstrap: str, topic: str, n: int) -> float:
    """Records/s of a bare consumer reading the whole topic (no decoding)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 << 20,
        fetch_max_bytes=32 << 20,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        got = 0
        started = time.perf_counter()
        while got < n:
            for recs in (await consumer.getmany(timeout_ms=1000, max_records=50_000)).values():
                got += len(recs)
        return got / (time.perf_counter() - started)
    finally:
        await consumer.stop()
