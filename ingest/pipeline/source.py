"""The source: one Kafka consumer in the group, positioned from what PostgreSQL stored.

On assignment each partition is moved to the position stored with the data (the database
is the source of truth); partitions with no stored position start at the group's Kafka
commit, or at the earliest record for a new group. Kafka offsets are committed after each
stored batch as well, for lag tooling, and only for partitions this consumer still owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError
from aiokafka.structs import OffsetAndMetadata

from ingest.service import metrics
from ingest.service.settings import Settings

log = structlog.get_logger("ingest.source")

PositionLoader = Callable[[], Awaitable[dict[tuple[str, int], int]]]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: EventSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._source._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._source._on_assigned(assigned)


class EventSource:
    """Reads records for the worker; knows which partitions are owned and where they stand."""

    def __init__(
        self,
        settings: Settings,
        load_positions: PositionLoader,
        on_revoked: Callable[[set[TopicPartition]], Awaitable[None]],
        kafka_options: dict[str, Any],
    ) -> None:
        self._settings = settings
        self._load_positions = load_positions
        self._on_revoked_cb = on_revoked
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=settings.kafka_group_id,
            enable_auto_commit=False,
            # 'none': an out-of-range position raises, so a skip is loud, never silent.
            auto_offset_reset="none",
            isolation_level="read_committed",
            max_partition_fetch_bytes=1024 * 1024,
            fetch_max_bytes=16 * 1024 * 1024,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
            max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
            # The broker answers a fetch after this long even with little data: it bounds
            # how stale a record can get before it reaches a batch.
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
            **kafka_options,
        )
        self.joined = False
        self.generation = 0
        self._paused_by_us: set[TopicPartition] = set()

    async def start(self) -> None:
        """Connect and subscribe (the group is joined on the first fetch)."""
        await self.consumer.start()
        self.consumer.subscribe(list(self._settings.kafka_topics), listener=_Listener(self))

    async def stop(self) -> None:
        """Leave the group and close connections."""
        await self.consumer.stop()

    def owned(self) -> set[TopicPartition]:
        """The partitions assigned to this consumer now."""
        return set(self.consumer.assignment())

    async def fetch(self, timeout_ms: int, max_records: int) -> list[Any]:
        """Up to ``max_records`` records, in offset order per partition."""
        try:
            batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except NoOffsetForPartitionError as exc:
            tp = exc.args[0] if exc.args else None
            log.info("no stored position, starting at the earliest record", partition=str(tp))
            await self._seek_to_beginning([tp] if isinstance(tp, TopicPartition) else None)
            return []
        except OffsetOutOfRangeError as exc:
            tps = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            for tp, offset in tps.items():
                metrics.OFFSET_RESETS.labels(tp.topic).inc()
                log.error(
                    "stored position is out of range on the broker: records before the "
                    "earliest retained offset are lost; resuming at the earliest",
                    topic=tp.topic,
                    partition=tp.partition,
                    position=offset,
                )
            await self._seek_to_beginning(list(tps) or None)
            return []
        records: list[Any] = []
        for tp_records in batches.values():
            records.extend(tp_records)
        return records

    async def _seek_to_beginning(self, tps: list[TopicPartition] | None) -> None:
        owned = self.owned()
        targets = [tp for tp in (tps or owned) if tp in owned]
        if targets:
            await self.consumer.seek_to_beginning(*targets)

    async def commit(self, positions: dict[tuple[str, int], int]) -> None:
        """Commit stored positions to Kafka for owned partitions; failures are only logged."""
        owned = self.owned()
        offsets = {
            tp: OffsetAndMetadata(pos, "")
            for (topic, partition), pos in positions.items()
            if (tp := TopicPartition(topic, partition)) in owned
        }
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # The database holds the truth; the next batch's commit catches Kafka up.
            metrics.RETRIES.labels("kafka_commit").inc()
            log.warning("kafka offset commit failed", error=repr(exc))

    def pause(self) -> None:
        """Stop fetching from every owned partition (the fetch loop keeps polling)."""
        owned = self.owned()
        self.consumer.pause(*owned)
        self._paused_by_us = owned
        metrics.PARTITIONS_PAUSED.set(len(owned))

    def resume(self) -> None:
        """Undo ``pause``."""
        owned = self.owned() & self._paused_by_us
        if owned:
            self.consumer.resume(*owned)
        self._paused_by_us = set()
        metrics.PARTITIONS_PAUSED.set(0)

    @property
    def paused(self) -> bool:
        """True while ``pause`` is in force."""
        return bool(self._paused_by_us)

    def report_lag(self, positions: dict[tuple[str, int], int]) -> None:
        """Set the lag gauge from the fetch high watermarks and the stored positions."""
        for tp in self.owned():
            hw = self.consumer.highwater(tp)
            pos = positions.get((tp.topic, tp.partition))
            if hw is not None and pos is not None:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, hw - pos))

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        started = time.monotonic()
        await self._on_revoked_cb(revoked)
        for tp in revoked:
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
        log.info(
            "partitions revoked",
            partitions=sorted(f"{t.topic}/{t.partition}" for t in revoked),
            took_s=round(time.monotonic() - started, 3),
        )

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.generation += 1
        stored: dict[tuple[str, int], int] = {}
        for attempt in range(5):
            try:
                stored = await self._load_positions()
                break
            except Exception as exc:
                log.warning("cannot load stored positions", error=repr(exc), attempt=attempt)
                await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
        else:
            # Without the stored positions the Kafka commit is used; the fence in the
            # database still drops anything already stored, so this costs time, not data.
            log.error("stored positions unavailable; starting from Kafka's committed offsets")
        for tp in assigned:
            pos = stored.get((tp.topic, tp.partition))
            if pos is not None:
                self.consumer.seek(tp, pos)
        if self._paused_by_us:
            # Still backing off: keep the new partitions paused too.
            self.pause()
        self.joined = True
        metrics.PARTITIONS_ASSIGNED.set(len(self.owned()))
        log.info(
            "partitions assigned",
            partitions=sorted(f"{t.topic}/{t.partition}" for t in assigned),
            from_database=sum(1 for tp in assigned if (tp.topic, tp.partition) in stored),
        )
