"""The worker: wires source -> decode/batch -> sink -> commit, and nothing else.

The loop itself holds no SQL and no Kafka protocol: it fetches, batches per lane
(``lanes``: each partition in one lane), hands a lane's batch to its write in flight
(``writes``: retried per ``policy``, with backpressure), then commits to Kafka what the
database stored. Each other concern has its own home: connecting with
retries (``connections``), the retry waits and the shutdown deadline (``retry``), the
probes' bookkeeping (``health``), the dead-letter breaker's hold (``breaker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import structlog
from aiokafka import TopicPartition

from ingest.pipeline.batch import BatchBuilder, to_item
from ingest.pipeline.breaker import BreakerHold, DeadLetterBreaker
from ingest.pipeline.connections import Connections
from ingest.pipeline.health import HealthWatch
from ingest.pipeline.lanes import Lane, WriteLanes
from ingest.pipeline.positions import StoredPosition
from ingest.pipeline.retry import Retries, Shutdown, ShutdownRequested
from ingest.pipeline.sink import Item
from ingest.pipeline.writes import InFlightWrite
from ingest.service import metrics, security
from ingest.service.probes import Health, ProbeServer
from ingest.service.settings import Settings

__all__ = ["ShutdownRequested", "Worker"]

log = structlog.get_logger("ingest.worker")

# Records asked of the consumer per poll.
FETCH_CHUNK = 500
# Records decoded between two returns to the event loop: decoding is CPU work, and the write
# in flight makes progress only when the loop runs (each of its dozen round trips waits for
# a turn). A poll answered from aiokafka's buffer does not return to the loop at all.
DECODE_SLICE = 100


class Worker:
    """One replica of the consumer group."""

    def __init__(self, settings: Settings, kafka_options: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.kafka_options = (
            kafka_options if kafka_options is not None else (security.kafka_options(settings))
        )
        self.health = Health()
        self.shutdown = Shutdown(settings.shutdown_timeout_s)
        self.stopping = self.shutdown.stopping
        self.probes = ProbeServer(
            self.health,
            settings.http_port,
            on_ready=lambda ok: metrics.READY.set(int(ok)),
            actions={"/breaker/reset": self.reset_breaker},
        )
        self.breaker = DeadLetterBreaker(
            window=settings.breaker_window,
            max_ratio=settings.breaker_max_ratio,
            min_records=settings.breaker_min_records,
            max_consecutive=settings.breaker_max_consecutive,
            cooldown_s=settings.breaker_cooldown_s,
        )
        self._hold = BreakerHold(self.breaker, self.health)
        retries = Retries(self.health, settings.retry_max_backoff_s)
        self.connections = Connections(
            settings, self.kafka_options, retries, self.shutdown, self.health
        )

        def lane() -> Lane:
            write = InFlightWrite(
                self.connections,
                retries,
                self.shutdown,
                self.health,
                self.breaker,
                on_reset=self._follow_reset,
            )
            batch = BatchBuilder(
                settings.batch_max_events,
                settings.batch_max_wait_ms / 1000,
                max_bytes=settings.max_batch_bytes,
            )
            return Lane(batch, write)

        self._lanes = WriteLanes([lane() for _ in range(settings.write_lanes)])
        self._watch = HealthWatch(self.health, self.connections, self._lanes.idle)
        # Per partition, the next offset to store: what the database holds, as last seen.
        self._positions: dict[tuple[str, int], int] = {}

    def request_stop(self) -> None:
        """Begin a graceful shutdown (signal handlers call this)."""
        self.shutdown.request()

    def reset_breaker(self) -> str:
        """Close the dead-letter breaker (operator action); consumption resumes."""
        return self._hold.close(self.connections.source)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT ask for a graceful stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def run(self) -> None:
        """Run until asked to stop; store and commit what is in flight, then leave the group."""
        await self.probes.start()
        log.info(
            "worker starting",
            database=self.settings.database_url_redacted,
            kafka=self.settings.kafka_bootstrap_servers,
            topics=list(self.settings.kafka_topics),
            group=self.settings.kafka_group_id,
            group_instance_id=self.settings.kafka_group_instance_id,
            dlq=self.settings.kafka_dlq_topic,
            http_port=self.probes.port,
        )
        beat = asyncio.create_task(self._watch.heartbeat())
        try:
            if await self.connections.open(self._load_positions, self._on_revoked):
                await self._consume()
        finally:
            beat.cancel()
            await self.connections.close()
            await self.probes.stop()
            log.info("worker stopped")

    async def _consume(self) -> None:
        try:
            await self._consume_until_stopped()
            await self._drain()
        except ShutdownRequested:
            log.warning(
                "shutdown deadline passed before the batch in flight was stored; "
                "the next owner reads it again"
            )
        finally:
            await self._lanes.abandon()

    async def _consume_until_stopped(self) -> None:
        src = self.connections.source
        assert src is not None
        while not self.stopping.is_set():
            if self.breaker.is_open:
                self._take_in(await self._hold.wait(src))
                continue
            buffered = len(self._lanes)
            timeout_ms = max(1, int(self._lanes.time_left() * 1000)) if buffered else 500
            records = await src.fetch(
                timeout_ms=timeout_ms, max_records=max(1, min(self._lanes.room, FETCH_CHUNK))
            )
            await self._watch.after_fetch(src)
            for start in range(0, len(records), DECODE_SLICE):
                self._take_in(records[start : start + DECODE_SLICE])
                await asyncio.sleep(0)
            # Free lanes first: a lane still writing is waited for only after the others'
            # batches are on their way.
            for lane in sorted(self._lanes.ready(), key=lambda lane: lane.write.busy):
                # One write in flight per lane: the lane's next batch is fetched and decoded
                # while its current one is written, then waits for it.
                await lane.write.wait(self._take_in)
                if not self.breaker.is_open:
                    lane.write.start(self._write(lane.write, lane.batch.take()))
            src.report_lag(self._positions)

    async def _drain(self) -> None:
        """Shutdown: finish the write in flight, then store and commit what was already
        fetched, within the deadline (less a reserve for leaving the group); an unfinished
        write is rolled back, not committed."""
        try:
            async with asyncio.timeout(self.shutdown.budget_s()):
                for lane in self._lanes:
                    await lane.write.wait(self._take_in)
                for lane in self._lanes:
                    if len(lane.batch) and not self.breaker.is_open:
                        await self._write(lane.write, lane.batch.take())
        except TimeoutError:
            raise ShutdownRequested from None

    def _take_in(self, records: list[Any]) -> None:
        if not records:
            return
        counts: dict[str, int] = {}
        for r in records:
            counts[r.topic] = counts.get(r.topic, 0) + 1
        for topic, n in counts.items():
            metrics.EVENTS_CONSUMED.labels(topic).inc(n)
        self._lanes.add(to_item(r) for r in records)

    async def _write(self, write: InFlightWrite, items: list[Item]) -> None:
        """Store one batch (as ``write``), commit to Kafka what was stored, and feed the
        breaker."""
        src = self.connections.source
        assert src is not None
        stored = await write.store(items)
        if stored is None:
            return
        t_commit = time.perf_counter()
        await src.commit(stored.result.positions)
        commit_s = time.perf_counter() - t_commit
        self._positions.update(stored.result.positions)
        stored.report(commit_s)
        self._hold.record(stored.outcomes(), src)

    async def _load_positions(self) -> dict[tuple[str, int], StoredPosition]:
        assert self.connections.writer is not None
        stored = await self.connections.writer.load_positions()
        self._positions = {k: s.next_offset for k, s in stored.items()}
        return stored

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Let a write in flight finish (its commit is still ours to make); past the budget,
        # go on: the fence in the database keeps a late write from storing twice.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lanes.wait_idle(), self.settings.rebalance_timeout_s)
        dropped = self._lanes.drop(
            lambda i: TopicPartition(i.ref.topic, i.ref.partition) not in revoked
        )
        self._lanes.forget((tp.topic, tp.partition) for tp in revoked)
        if dropped:
            log.info("dropped buffered records of revoked partitions", records=dropped)

    def _follow_reset(self, positions: dict[tuple[str, int], int], items: list[Item]) -> list[Item]:
        """Read again from positions an operator moved back; return the batch without the
        records of those partitions (they come again, from the new positions)."""
        assert self.connections.source is not None
        log.warning(
            "stored positions were moved back under this worker (ingest positions reset "
            "--force); reading again from them",
            positions={f"{t}/{p}": o for (t, p), o in sorted(positions.items())},
        )
        self.connections.source.seek(positions)
        self._positions.update(positions)

        def keep(i: Item) -> bool:
            return (i.ref.topic, i.ref.partition) not in positions

        self._lanes.drop(keep)
        return [i for i in items if keep(i)]
