"""The Python floor: the CPU per record of a bare Python reader of the corpus.

What any Python consumer of the topic pays before it does anything with an event: aiokafka
reads the records (with the worker's fetch sizes), orjson decodes each value, and the id,
the call id and the event time are parsed; no database. Absolute microseconds move 2-3x
between machines; the worker's CPU per event as a multiple of this floor, measured in the
same run, is what carries over.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Final
from uuid import UUID

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from ingest.tools.bench.corpus import PARTITIONS
from ingest.tools.bench.drains import Drain
from ingest.tools.bench.report import Result

# Records read by each floor run around a drain: the floor is a per-record figure, steady
# long before this many, and each run costs the drain's time on the same cores.
FLOOR_RECORDS: Final = 200_000


async def python_floor(bootstrap: str, topic: str, n: int) -> float:
    """CPU microseconds per record (user + system, this process) of reading all ``n``
    records of ``topic`` and decoding each one's envelope."""
    async with corpus_reader(bootstrap, topic) as consumer:
        got = 0
        cpu_started = time.process_time()
        while got < n:
            for recs in (await consumer.getmany(timeout_ms=1000, max_records=5_000)).values():
                for rec in recs:
                    _envelope(orjson.loads(rec.value), rec.timestamp)
                got += len(recs)
        return (time.process_time() - cpu_started) / max(got, 1) * 1e6


@contextlib.asynccontextmanager
async def corpus_reader(bootstrap: str, topic: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer of every partition of ``topic`` from the start, with no group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # The worker's fetch sizes (source.py), so the reads cost what the worker's do.
        max_partition_fetch_bytes=1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        yield consumer
    finally:
        await consumer.stop()


def _envelope(obj: dict[str, object], timestamp_ms: int) -> tuple[UUID, UUID, datetime]:
    """The id, the call id and the event time: the least a consumer parses of an event."""
    created = obj.get("created_at")
    at = (
        datetime.fromisoformat(str(created))
        if created is not None
        else datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
    )
    return UUID(str(obj["id"])), UUID(str(obj["call_id"])), at


async def floor_around(
    bootstrap: str, topic: str, n: int, measure: Callable[[], Awaitable[Drain]]
) -> Drain:
    """Run ``measure`` (a drain) between two runs of the floor, and keep their mean with it.

    A shared machine's speed drifts by a third within minutes (the floor of one bench run
    ranged from 5.9 to 9.8 us in an hour, nothing else running): a floor measured once at
    the start of a run of several minutes would make the later drains' ratios drift with
    it. A floor on both sides of the drain moves with the machine as the drain did."""
    records = min(n, FLOOR_RECORDS)
    before = await python_floor(bootstrap, topic, records)
    d = await measure()
    after = await python_floor(bootstrap, topic, records)
    d.floor_us = (before + after) / 2
    return d


def with_floor_ratios(result: Result) -> None:
    """Set every drain's CPU per event as a multiple of its own floor, or of the run's when
    it has none (0: no floor at all)."""
    for srv in result.servers:
        for st in srv.states:
            for d in st.drains:
                floor = d.floor_us or result.floor_us_per_record
                d.cpu_x_floor = d.cpu_us_per_event / floor if floor > 0 else 0.0
