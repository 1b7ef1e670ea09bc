"""The CPU ladder: where a worker's CPU per event above the Python floor goes.

The same records are read again in this process, once per rung, each rung doing a little
more of what the worker does; each rung's CPU per record is given as a multiple of the
floor measured at the bottom and at the top of the ladder:

1. the floor itself: aiokafka read, orjson decode, the id, call id and time parsed;
2. **read, parse, COPY**: the least any Python writer of the rows pays: the same read and
   decode, the ids and the time parsed the worker's way (asyncpg's UUID, ``fromisoformat``)
   and the five ``call_events`` columns stored by binary COPY into a temporary table, one
   batch at a time;
3. **read, decode, COPY**: the worker's own decoding (``to_item``: the contract's checks,
   the records' tuples) and the same COPY;
4. **read, decode, sink**: the worker's decoding and its ``BatchWriter.write`` on the bench
   database (the fence, the orphan and repeat checks, the dedup look-back, the call plan,
   the positions), one batch at a time, on the worker's own pool.

The drain's CPU per event is the rung above: the worker process adds its loop, the write
lanes, the metrics and the commits to Kafka. Every rung runs with the worker's collector
settings (``ingest run``'s, ``cli.tune_collector``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from asyncpg.pgproto.pgproto import UUID as FastUUID

from ingest.cli import tune_collector
from ingest.pipeline.batch import to_item
from ingest.pipeline.contract import CallEvent
from ingest.pipeline.deadletter import DeadLetterPublisher
from ingest.pipeline.sessions import open_pool
from ingest.pipeline.sink import BatchWriter
from ingest.service.settings import Settings
from ingest.tools.bench.corpus import Target, clean
from ingest.tools.bench.floor import corpus_reader, python_floor

# Records each rung reads: like the floor's runs, enough for a steady per-record figure.
LADDER_RECORDS: Final = 200_000

_COLUMNS: Final = ["id", "call_id", "event_type", "event_data", "created_at"]
_SCRATCH: Final = (
    "CREATE TEMPORARY TABLE ladder_events (id uuid, call_id uuid, event_type text, "
    "event_data jsonb, created_at timestamptz)"
)


@dataclass
class Rung:
    """One step of the ladder: what it does, and its CPU per record."""

    name: str
    us_per_record: float
    x_floor: float = 0.0


@dataclass
class Ladder:
    """The rungs in order, the floor first; ``floor_us`` is the mean of the floor's runs at
    the bottom and the top."""

    records: int
    floor_us: float = 0.0
    rungs: list[Rung] = field(default_factory=list)


Rows = list[Any]


async def _read(
    bootstrap: str,
    topic: str,
    n: int,
    batch: int,
    per_record: Callable[[Any], Any],
    per_batch: Callable[[Rows], Awaitable[object]],
) -> float:
    """CPU microseconds per record of reading ``n`` records of ``topic``, passing each to
    ``per_record`` and every ``batch`` of its results to ``per_batch``."""
    async with corpus_reader(bootstrap, topic) as consumer:
        got = 0
        rows: Rows = []
        cpu_started = time.process_time()
        while got < n:
            for recs in (await consumer.getmany(timeout_ms=1000, max_records=batch)).values():
                taken = recs[: n - got]
                rows.extend(map(per_record, taken))
                got += len(taken)
                if len(rows) >= batch:
                    await per_batch(rows)
                    rows = []
        if rows:
            await per_batch(rows)
        return (time.process_time() - cpu_started) / max(got, 1) * 1e6


def parsed_row(record: Any) -> tuple[Any, ...]:
    """The five ``call_events`` columns of a record with no check at all: the least a
    writer of the row does."""
    obj = orjson.loads(record.value)
    return (
        FastUUID(obj["id"]),
        FastUUID(obj["call_id"]),
        obj["event_type"],
        orjson.dumps(obj["event_data"]).decode(),
        datetime.fromisoformat(obj["created_at"]),
    )


async def _check_stored_once(conn: asyncpg.Connection, stored: int) -> None:
    """Fail unless the events the sink said it stored are in the table, each once."""
    total, distinct = await conn.fetchrow("SELECT count(*), count(DISTINCT id) FROM call_events")
    if not total == distinct == stored > 0:
        raise SystemExit(
            f"bench: the CPU ladder's sink stored {total} rows, {distinct} ids; it said {stored}"
        )


@contextlib.contextmanager
def worker_collector() -> Iterator[None]:
    """The collector as ``ingest run`` sets it, for the duration."""
    thresholds = gc.get_threshold()
    tune_collector()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def cpu_ladder(target: Target, bootstrap: str, topic: str, n: int, batch: int) -> Ladder:
    """Climb the ladder on ``target`` (empty tables; cleaned again afterwards) with the
    first ``n`` records of ``topic`` (at most ``LADDER_RECORDS``)."""
    n = min(n, LADDER_RECORDS)
    ladder = Ladder(n)
    # The drains' workers' settings: the environment's (INGEST_DEDUP_WINDOW=off, say), then
    # the bench's database and topic.
    settings = Settings.from_env(
        {
            **os.environ,
            "DATABASE_URL": target.url,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_TOPICS": topic,
            "KAFKA_DLQ_TOPIC": f"{topic}.dlq",
            "KAFKA_GROUP_ID": f"bench-ladder-{time.time_ns()}",
        }
    )
    await clean(target)
    pool = await open_pool(settings)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        writer = BatchWriter(
            pool,
            settings.kafka_group_id,
            DeadLetterPublisher(producer, settings.kafka_dlq_topic),
            write_timeout_s=settings.write_timeout_s,
            dedup_window=settings.dedup_lookback,
        )
        async with pool.acquire() as conn:
            await conn.execute(_SCRATCH)

            async def copy(rows: Rows) -> None:
                await conn.copy_records_to_table("ladder_events", records=rows, columns=_COLUMNS)

            stored = 0

            async def store(items: Rows) -> None:
                nonlocal stored
                stored += len((await writer.write(items)).written)

            async def copy_items(items: Rows) -> None:
                await copy([i.decoded[:5] for i in items if isinstance(i.decoded, CallEvent)])

            with worker_collector():
                floor_before = await python_floor(bootstrap, topic, n)
                steps: list[tuple[str, Callable[[Any], Any], Callable[[Rows], Awaitable[object]]]]
                steps = [
                    ("read, parse, COPY", parsed_row, copy),
                    ("read, decode, COPY", to_item, copy_items),
                    ("read, decode, sink", to_item, store),
                ]
                for name, per_record, per_batch in steps:
                    ladder.rungs.append(
                        Rung(name, await _read(bootstrap, topic, n, batch, per_record, per_batch))
                    )
                floor_after = await python_floor(bootstrap, topic, n)
            await _check_stored_once(conn, stored)
    finally:
        await producer.stop()
        await pool.close()
        await clean(target)
    ladder.floor_us = (floor_before + floor_after) / 2
    ladder.rungs.insert(0, Rung("floor: read, parse", ladder.floor_us))
    for rung in ladder.rungs:
        rung.x_floor = rung.us_per_record / ladder.floor_us if ladder.floor_us > 0 else 0.0
    return ladder
