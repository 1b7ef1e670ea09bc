"""Topic checks at start: the source topics and the dead-letter topic must exist.

A missing topic is waited for (the worker stays unready and says so every 30 s); the
dead-letter topic is created instead when ``KAFKA_DLQ_CREATE`` allows it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from ingest.service.settings import Settings

log = structlog.get_logger("ingest.topics")


async def describe(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, tuple[int, int]]:
    """(partitions, replicas of the first partition) per existing topic among ``names``."""
    existing = set(await admin.list_topics())
    wanted = [n for n in names if n in existing]
    if not wanted:
        return {}
    out: dict[str, tuple[int, int]] = {}
    for d in await admin.describe_topics(wanted):
        parts = d.get("partitions") or []
        if not d.get("error_code") and parts:
            out[d["topic"]] = (len(parts), max(1, len(parts[0].get("replicas") or [1])))
    return out


async def ensure_topics(
    settings: Settings,
    kafka_options: dict[str, Any],
    stopping: asyncio.Event,
    report_interval_s: float = 30.0,
) -> bool:
    """Return True once every needed topic exists; False if stopping was asked first."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, **kafka_options)
    await admin.start()
    try:
        needed = [*settings.kafka_topics, settings.kafka_dlq_topic]
        last_report = -report_interval_s
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            counts = await describe(admin, needed)
            missing = [n for n in needed if n not in counts]
            if settings.kafka_dlq_topic in missing and settings.kafka_dlq_create:
                await _create_dlq(admin, settings, counts)
                continue
            if not missing:
                return True
            if loop.time() - last_report >= report_interval_s:
                last_report = loop.time()
                log.error(
                    "waiting for topics to exist; not ready until they do",
                    missing=missing,
                    hint="create them, or set KAFKA_DLQ_CREATE=true for the dead-letter topic",
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 2.0)
        return False
    finally:
        await admin.close()


async def _create_dlq(
    admin: AIOKafkaAdminClient, settings: Settings, found: dict[str, tuple[int, int]]
) -> None:
    # By default the dead-letter topic mirrors the (largest) source topic's layout.
    sources = [found[t] for t in settings.kafka_topics if t in found] or [(1, 1)]
    partitions = settings.kafka_dlq_partitions or max(p for p, _ in sources)
    replication = settings.kafka_dlq_replication or max(r for _, r in sources)
    topic = NewTopic(
        settings.kafka_dlq_topic, num_partitions=partitions, replication_factor=replication
    )
    try:
        await admin.create_topics([topic])
        log.info(
            "created the dead-letter topic",
            topic=settings.kafka_dlq_topic,
            partitions=partitions,
            replication_factor=replication,
        )
    except TopicAlreadyExistsError:
        pass
