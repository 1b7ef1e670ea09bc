"""``ingest dlq replay``: republish dead letters to their source topic once the cause is fixed.

Reads the dead-letter topic with its own consumer group (``<KAFKA_GROUP_ID>.dlq-replay``,
suffixed ``.<reason>`` with ``--reason``),
keeps the records matching ``--reason`` and ``--since``, and publishes their original key
and value to the topic named in ``x-ingest-source-topic``. Its offsets are committed after
the broker acknowledged the republished records, so a stopped replay resumes where it
stood and a record is never skipped (it may be republished twice after a crash; the
worker drops a repeated event id). ``--dry-run`` reads and counts, publishes and commits
nothing. It stops once it has read up to the end of the topic as it was when it started.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from ingest.pipeline.deadletter import H_REASON, H_TOPIC, header_map
from ingest.service.settings import Settings

REPLAY_HEADER = "x-ingest-replayed-from"


@dataclass(slots=True)
class ReplayStats:
    """What a replay read and did."""

    scanned: int = 0
    matched: Counter[str] = field(default_factory=Counter)
    republished: int = 0
    skipped_no_source: int = 0


def replay_group(settings: Settings, reason: str | None) -> str:
    """The consumer group that keeps the replay's progress: one per reason filter, so a
    replay of one reason never moves past dead letters of another."""
    base = f"{settings.kafka_group_id}.dlq-replay"
    return base if reason is None else f"{base}.{reason}"


def matches(
    headers: dict[str, str], timestamp_ms: int, reason: str | None, since: datetime | None
) -> bool:
    """True when a dead letter passes the ``--reason`` and ``--since`` filters."""
    if reason is not None and headers.get(H_REASON) != reason:
        return False
    return since is None or timestamp_ms >= since.timestamp() * 1000


async def replay(
    settings: Settings,
    reason: str | None = None,
    since: datetime | None = None,
    dry_run: bool = False,
    idle_s: float = 3.0,
    kafka_options: dict[str, Any] | None = None,
) -> ReplayStats:
    """Run one replay pass; see the module docstring."""
    opts = kafka_options or {}
    stats = ReplayStats()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=replay_group(settings, reason),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **opts,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        linger_ms=5,
        enable_idempotence=False,
        **opts,
    )
    await consumer.start()
    await producer.start()
    try:
        await consumer.topics()
        parts = consumer.partitions_for_topic(settings.kafka_dlq_topic) or set()
        tps = [TopicPartition(settings.kafka_dlq_topic, p) for p in sorted(parts)]
        if not tps:
            return stats
        consumer.assign(tps)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            got = await consumer.getmany(timeout_ms=500, max_records=1000)
            if not got:
                if await _at_end(consumer, tps):
                    break
                continue
            quiet_since = time.monotonic()
            pending: list[asyncio.Future[Any]] = []
            commit: dict[TopicPartition, OffsetAndMetadata] = {}
            for tp, records in got.items():
                for r in records:
                    stats.scanned += 1
                    headers = header_map(r.headers)
                    if not matches(headers, r.timestamp, reason, since):
                        continue
                    source = headers.get(H_TOPIC)
                    if not source:
                        stats.skipped_no_source += 1
                        continue
                    stats.matched[headers.get(H_REASON, "?")] += 1
                    if not dry_run:
                        origin = f"{r.topic}/{r.partition}/{r.offset}".encode()
                        pending.append(
                            await producer.send(
                                source, key=r.key, value=r.value, headers=[(REPLAY_HEADER, origin)]
                            )
                        )
                commit[tp] = OffsetAndMetadata(records[-1].offset + 1, "")
            if not dry_run:
                await asyncio.gather(*pending)
                stats.republished += len(pending)
                await consumer.commit(commit)
    finally:
        await producer.stop()
        await consumer.stop()
    return stats


async def _at_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> bool:
    for tp in tps:
        hw = consumer.highwater(tp)
        if hw is None or await consumer.position(tp) < hw:
            return False
    return True
