"""The worker's connections: opened in order, each retried until it succeeds or a shutdown is
requested, and closed in reverse.

The database first (nothing can be stored or resumed without it), then the topics, the
dead-letter producer, the ``BatchWriter`` and, last, the ``EventSource``, which joins the
group: a worker joins only once it can store what it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from ingest.pipeline import sessions
from ingest.pipeline.deadletter import DeadLetterPublisher
from ingest.pipeline.positions import StoredPosition
from ingest.pipeline.retry import Retries, Shutdown
from ingest.pipeline.sink import BatchWriter
from ingest.pipeline.source import EventSource
from ingest.service import security
from ingest.service.probes import Health
from ingest.service.settings import Settings
from ingest.service.topics import ensure_topics

# Bound of closing each connection at shutdown.
CLOSE_TIMEOUT_S = 5


class Connections:
    """The pool, the producer, the writer and the source of one worker (None until open)."""

    def __init__(
        self,
        settings: Settings,
        kafka_options: dict[str, Any],
        retries: Retries,
        shutdown: Shutdown,
        health: Health,
    ) -> None:
        self._settings = settings
        self._kafka_options = kafka_options
        self._retries = retries
        self._shutdown = shutdown
        self._health = health
        self.pool: asyncpg.Pool | None = None
        self.producer: AIOKafkaProducer | None = None
        self.writer: BatchWriter | None = None
        self.source: EventSource | None = None

    async def open(
        self,
        load_positions: Callable[[], Awaitable[dict[tuple[str, int], StoredPosition]]],
        on_revoked: Callable[[set[TopicPartition]], Awaitable[None]],
    ) -> bool:
        """Open everything, retrying; False if a shutdown was requested first."""
        s = self._settings
        backoff = self._retries.backoff()
        while self.pool is None:
            try:
                self.pool = await sessions.open_pool(s)
            except Exception as exc:
                if await self._shutdown.sleep(self._retries.delay_after(exc, backoff)):
                    return False
        self._health.database_ok = True

        backoff.reset()
        while True:
            try:
                if not await ensure_topics(s, self._kafka_options, self._shutdown.stopping):
                    return False
                break
            except KafkaError as exc:
                # Unreachable broker: retried. A certificate that does not verify: standing.
                cause = await security.kafka_tls_failure(s, self._kafka_options)
                delay = self._retries.delay_after(cause or exc, backoff, "kafka")
                if await self._shutdown.sleep(delay):
                    return False
        self.producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            acks="all",
            linger_ms=5,
            enable_idempotence=False,
            **self._kafka_options,
        )
        await self.producer.start()
        publisher = DeadLetterPublisher(self.producer, s.kafka_dlq_topic)
        self.writer = BatchWriter(
            self.pool,
            s.kafka_group_id,
            publisher,
            write_timeout_s=s.write_timeout_s,
            dedup_window=s.dedup_lookback,
        )
        self.source = EventSource(
            s, load_positions, on_revoked, self._kafka_options, on_seek=self.writer.reading_from
        )
        await self.source.start()
        self._health.not_ready_because = None
        return True

    async def close(self) -> None:
        """Leave the group, then close the producer and the pool (each within a bound)."""
        if self.source is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.source.stop(), CLOSE_TIMEOUT_S)
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.producer.stop(), CLOSE_TIMEOUT_S)
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), CLOSE_TIMEOUT_S)
