"""The worker: wires source -> decode/batch -> sink -> commit, and keeps the probes honest.

The loop itself holds no SQL and no Kafka protocol: it fetches, batches, hands a batch to
the ``BatchWriter`` (retrying per ``policy``), then commits to Kafka what the database
stored. While a write cannot succeed it pauses every partition and keeps polling, so the
consumer stays in its group and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import time
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from ingest.pipeline import sessions
from ingest.pipeline.batch import BatchBuilder, to_item
from ingest.pipeline.breaker import DeadLetterBreaker
from ingest.pipeline.deadletter import DeadLetterPublisher
from ingest.pipeline.policy import Backoff, Disposition, classify, is_retryable, sqlstate_class
from ingest.pipeline.positions import StoredPosition
from ingest.pipeline.sink import BatchWriter, Item, PositionsMovedBack, WriteResult
from ingest.pipeline.source import EventSource
from ingest.service import metrics, security
from ingest.service.probes import Health, ProbeServer
from ingest.service.settings import Settings
from ingest.service.topics import ensure_topics

log = structlog.get_logger("ingest.worker")

STANDING_LOG_EVERY_S = 60.0
STANDING_RETRY_MIN_S = 5.0
PING_EVERY_S = 5
CLOSE_RESERVE_S = 3.0
# Records asked of the consumer per poll.
FETCH_CHUNK = 500
# Records decoded between two returns to the event loop: decoding is CPU work, and the write
# in flight makes progress only when the loop runs (each of its dozen round trips waits for
# a turn). A poll answered from aiokafka's buffer does not return to the loop at all.
DECODE_SLICE = 100
# A write in flight longer than this pauses the partitions (backpressure).
PAUSE_AFTER_S = 2.0


class ShutdownRequested(Exception):
    """Raised out of a retry loop when the shutdown deadline has passed."""


class Worker:
    """One replica of the consumer group."""

    def __init__(self, settings: Settings, kafka_options: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.kafka_options = (
            kafka_options if kafka_options is not None else (security.kafka_options(settings))
        )
        self.health = Health()
        self.stopping = asyncio.Event()
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
        self._pool: asyncpg.Pool | None = None
        self._producer: AIOKafkaProducer | None = None
        self._source: EventSource | None = None
        self._writer: BatchWriter | None = None
        self._batch = BatchBuilder(
            settings.batch_max_events,
            settings.batch_max_wait_ms / 1000,
            max_bytes=settings.max_batch_bytes,
        )
        self._positions: dict[tuple[str, int], int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight: asyncio.Task[None] | None = None
        self._retrying = False
        self._shutdown_deadline: float | None = None
        self._last_standing_log = -STANDING_LOG_EVERY_S

    def request_stop(self) -> None:
        """Begin a graceful shutdown (signal handlers call this)."""
        if not self.stopping.is_set():
            log.info("shutdown requested", timeout_s=self.settings.shutdown_timeout_s)
            self._shutdown_deadline = time.monotonic() + self.settings.shutdown_timeout_s
            self.stopping.set()

    def reset_breaker(self) -> str:
        """Close the dead-letter breaker (operator action); consumption resumes."""
        was = self.breaker.reason
        self.breaker.reset()
        self.health.breaker_open = None
        metrics.BREAKER_OPEN.set(0)
        if self._source is not None and self._source.paused:
            self._source.resume()
        if was:
            log.warning("dead-letter breaker closed; consuming again", was=was)
            return f"breaker closed (was open: {was})"
        return "breaker was not open"

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
        beat = asyncio.create_task(self._heartbeat())
        try:
            if not await self._connect():
                return
            await self._consume()
        finally:
            beat.cancel()
            await self._close()
            await self.probes.stop()
            log.info("worker stopped")

    async def _heartbeat(self) -> None:
        # Liveness: this task runs on the same loop as the work; if the loop is blocked,
        # /healthz itself cannot answer, which is what a liveness probe should see.
        tick = 0
        while True:
            self.health.beat()
            self._report_pool()
            metrics.READY.set(int(self.health.ready()[0]))
            if tick % PING_EVERY_S == 0 and self._writer is not None and self._idle.is_set():
                await self._ping()
            tick += 1
            await asyncio.sleep(1)

    async def _ping(self) -> None:
        assert self._writer is not None
        try:
            await self._writer.ping(PING_EVERY_S)
        except Exception as exc:
            if self.health.database_ok:
                log.warning("database unreachable", error=_short(exc))
            self.health.database_ok = False
        else:
            self.health.database_ok = True

    def _report_pool(self) -> None:
        if self._pool is not None:
            size, idle = self._pool.get_size(), self._pool.get_idle_size()
            metrics.DB_POOL_CONNECTIONS.labels("in_use").set(size - idle)
            metrics.DB_POOL_CONNECTIONS.labels("idle").set(idle)

    async def _connect(self) -> bool:
        s = self.settings
        backoff = Backoff(cap_s=s.retry_max_backoff_s)
        while self._pool is None:
            try:
                self._pool = await sessions.open_pool(s)
            except Exception as exc:
                delay = backoff.next_delay()
                if self._note_failure(exc) is Disposition.STANDING:
                    delay = max(delay, STANDING_RETRY_MIN_S)
                if await self._sleep_or_stop(delay):
                    return False
        self.health.database_ok = True

        backoff.reset()
        while True:
            try:
                if not await ensure_topics(s, self.kafka_options, self.stopping):
                    return False
                break
            except KafkaError as exc:
                # Unreachable broker: retried. A certificate that does not verify: standing.
                cause = await security.kafka_tls_failure(s, self.kafka_options)
                delay = backoff.next_delay()
                if self._note_failure(cause or exc, "kafka") is Disposition.STANDING:
                    delay = max(delay, STANDING_RETRY_MIN_S)
                if await self._sleep_or_stop(delay):
                    return False
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            acks="all",
            linger_ms=5,
            enable_idempotence=False,
            **self.kafka_options,
        )
        await self._producer.start()
        publisher = DeadLetterPublisher(self._producer, s.kafka_dlq_topic)
        self._writer = BatchWriter(
            self._pool,
            s.kafka_group_id,
            publisher,
            write_timeout_s=s.write_timeout_s,
            dedup_window=s.dedup_lookback,
        )
        self._source = EventSource(
            s,
            self._load_positions,
            self._on_revoked,
            self.kafka_options,
            on_seek=self._writer.reading_from,
        )
        await self._source.start()
        self.health.not_ready_because = None
        return True

    async def _load_positions(self) -> dict[tuple[str, int], StoredPosition]:
        assert self._writer is not None
        stored = await self._writer.load_positions()
        self._positions = {k: s.next_offset for k, s in stored.items()}
        return stored

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Let a write in flight finish (its commit is still ours to make); past the budget,
        # go on: the fence in the database keeps a late write from storing twice.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.settings.rebalance_timeout_s)
        dropped = self._batch.drop(
            lambda i: TopicPartition(i.ref.topic, i.ref.partition) not in revoked
        )
        if dropped:
            log.info("dropped buffered records of revoked partitions", records=dropped)

    async def _consume(self) -> None:
        try:
            await self._consume_until_stopped()
        except ShutdownRequested:
            log.warning(
                "shutdown deadline passed before the batch in flight was stored; "
                "the next owner reads it again"
            )
        finally:
            await self._abandon_write()

    async def _abandon_write(self) -> None:
        """End a write still in flight at shutdown: cancelled, its transaction rolls back
        with its discarded connection; its outcome is retrieved here, so that asyncio does
        not report it as "Task exception was never retrieved"."""
        task, self._in_flight = self._in_flight, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.info("write in flight ended at shutdown", error=_short(exc))

    async def _consume_until_stopped(self) -> None:
        src = self._source
        assert src is not None
        while not self.stopping.is_set():
            if self.breaker.is_open:
                await self._hold_while_breaker_open()
                continue
            timeout_ms = max(1, int(self._batch.time_left() * 1000)) if len(self._batch) else 500
            records = await src.fetch(
                timeout_ms=timeout_ms, max_records=max(1, min(self._batch.room, FETCH_CHUNK))
            )
            self.health.group_joined = src.joined
            await src.recheck_held()
            self.health.positions_mismatch = src.held_reason()
            self.health.stalled = [stall.describe() for stall in src.stalls.values()]
            for start in range(0, len(records), DECODE_SLICE):
                self._take_in(records[start : start + DECODE_SLICE])
                await asyncio.sleep(0)
            if self._batch.ready():
                # One write in flight at a time: the next batch is fetched and decoded while
                # the current one is written, then waits for it.
                await self._await_write()
                if not self.breaker.is_open:
                    self._in_flight = asyncio.create_task(self._write(self._batch.take()))
            src.report_lag(self._positions)
        # Shutdown: finish the write in flight, then store and commit what was already
        # fetched, within the deadline (less a reserve for leaving the group); an unfinished
        # write is rolled back, not committed.
        assert self._shutdown_deadline is not None
        budget = self._shutdown_deadline - time.monotonic() - CLOSE_RESERVE_S
        try:
            async with asyncio.timeout(max(0.1, budget)):
                await self._await_write()
                if len(self._batch) and not self.breaker.is_open:
                    await self._write(self._batch.take())
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
        self._batch.add(to_item(r) for r in records)

    async def _await_write(self) -> None:
        """Wait for the write in flight. A write that retries or takes long gets backpressure:
        partitions are paused and the consumer keeps polling, so it stays in its group
        however long the write takes. A quick write is waited for without pausing: a pause
        makes aiokafka drop what it has prefetched for those partitions."""
        task, src = self._in_flight, self._source
        if task is None:
            return
        assert src is not None
        paused_here = False
        since = time.monotonic()
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if task.done():
                break
            if self._retrying or time.monotonic() - since >= PAUSE_AFTER_S:
                if not src.paused:
                    src.pause()
                    paused_here = True
                self._take_in(await src.fetch(timeout_ms=0, max_records=1))
                self.health.group_joined = src.joined
        self._in_flight = None
        if paused_here and not self.breaker.is_open:
            src.resume()
        task.result()

    async def _write(self, items: list[Item]) -> None:
        src, writer = self._source, self._writer
        assert src is not None
        assert writer is not None
        backoff = Backoff(cap_s=self.settings.retry_max_backoff_s)
        self._idle.clear()
        partitions = {(i.ref.topic, i.ref.partition) for i in items}
        try:
            while True:
                owned = {(tp.topic, tp.partition) for tp in src.owned()}
                if not partitions <= owned:
                    items = [i for i in items if (i.ref.topic, i.ref.partition) in owned]
                    partitions &= owned
                if not items:
                    return
                started = time.perf_counter()
                try:
                    # Bounded by INGEST_WRITE_TIMEOUT_S: a dead peer can leave a read hanging.
                    result = await writer.write(items)
                except PositionsMovedBack as moved:
                    items = self._follow_reset(moved.positions, items)
                    continue
                except Exception as exc:
                    if not is_retryable(exc):
                        raise
                    self._retrying = True
                    disposition = self._note_failure(exc)
                    delay = backoff.next_delay()
                    if disposition is Disposition.STANDING:
                        delay = max(delay, STANDING_RETRY_MIN_S)
                    await self._sleep_before_retry(delay)
                    continue
                took = time.perf_counter() - started
                metrics.BATCH_WRITE_SECONDS.observe(took)
                break
        finally:
            self._idle.set()
            self._retrying = False
        self.health.database_ok = True
        self.health.not_ready_because = None
        t_commit = time.perf_counter()
        await src.commit(result.positions)
        self._record(items, result, took, time.perf_counter() - t_commit)
        dead = {dl.ref for dl in result.dead_letters}
        outcomes = [i.ref in dead for i in items] if dead else [False] * len(items)
        if self.breaker.record(outcomes, time.monotonic()):
            self._open_breaker()

    def _follow_reset(self, positions: dict[tuple[str, int], int], items: list[Item]) -> list[Item]:
        """Read again from positions an operator moved back; return the batch without the
        records of those partitions (they come again, from the new positions)."""
        assert self._source is not None
        log.warning(
            "stored positions were moved back under this worker (ingest positions reset "
            "--force); reading again from them",
            positions={f"{t}/{p}": o for (t, p), o in sorted(positions.items())},
        )
        self._source.seek(positions)
        self._positions.update(positions)

        def keep(i: Item) -> bool:
            return (i.ref.topic, i.ref.partition) not in positions

        self._batch.drop(keep)
        return [i for i in items if keep(i)]

    async def _sleep_before_retry(self, delay: float) -> None:
        """Sleep ``delay`` s; give up (ShutdownRequested) when the shutdown deadline nears."""
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            deadline = self._shutdown_deadline
            if deadline is not None and time.monotonic() >= deadline - CLOSE_RESERVE_S:
                raise ShutdownRequested
            await asyncio.sleep(min(left, 0.2))

    def _open_breaker(self) -> None:
        assert self._source is not None
        self.health.breaker_open = self.breaker.reason
        metrics.BREAKER_OPEN.set(1)
        self._source.pause()
        log.error(
            "dead-letter breaker open: consumption stopped",
            why=self.breaker.reason,
            closes_after_s=self.breaker.cooldown_s or None,
            reset="POST /breaker/reset",
        )

    async def _hold_while_breaker_open(self) -> None:
        src = self._source
        assert src is not None
        if self.breaker.due_to_close(time.monotonic()):
            self.reset_breaker()
            return
        self._take_in(await src.fetch(timeout_ms=500, max_records=1))

    def _record(
        self, items: list[Item], result: WriteResult, took_s: float, commit_s: float
    ) -> None:
        self._positions.update(result.positions)
        metrics.BATCH_EVENTS.observe(len(items))
        metrics.EVENTS_WRITTEN.inc(len(result.written))
        metrics.EVENTS_DUPLICATE.inc(result.duplicates)
        metrics.EVENTS_FENCED.inc(result.fenced)
        metrics.CALLS_TERMINATED.inc(result.terminated)
        now = time.time()
        metrics.EVENT_FRESHNESS_SECONDS.observe_many(
            [max(0.0, now - e.created_at.timestamp()) for e in result.written]
        )
        for dl in result.dead_letters:
            metrics.EVENTS_DEAD_LETTERED.labels(dl.reason).inc()
            log.warning(
                "dead-lettered a record",
                reason=dl.reason,
                detail=dl.detail,
                sqlstate=dl.sqlstate,
                topic=dl.ref.topic,
                partition=dl.ref.partition,
                offset=dl.ref.offset,
            )
        log.debug(
            "batch stored",
            records=len(items),
            written=len(result.written),
            duplicates=result.duplicates,
            dead_letters=len(result.dead_letters),
            fenced=result.fenced,
            write_ms=round(took_s * 1000, 1),
            kafka_commit_ms=round(commit_s * 1000, 1),
        )

    def _note_failure(self, exc: BaseException, target: str | None = None) -> Disposition:
        disposition = classify(exc)
        target = target or ("kafka" if isinstance(exc, KafkaError) else "database")
        metrics.RETRIES.labels(target).inc()
        if target == "database":
            metrics.DB_ERRORS.labels(sqlstate_class(exc)).inc()
            self.health.database_ok = False
        if disposition is Disposition.STANDING:
            self.health.not_ready_because = f"standing fault: {type(exc).__name__}"
            now = time.monotonic()
            if now - self._last_standing_log >= STANDING_LOG_EVERY_S:
                self._last_standing_log = now
                log.error(
                    "standing fault; consumption paused until it is fixed",
                    target=target,
                    error=_short(exc),
                    **_hint(exc),
                )
        else:
            self.health.not_ready_because = f"retrying after {type(exc).__name__}"
            log.warning("transient failure; retrying", target=target, error=_short(exc))
        return disposition

    async def _sleep_or_stop(self, delay: float) -> bool:
        try:
            await asyncio.wait_for(self.stopping.wait(), delay)
        except TimeoutError:
            return False
        return True

    async def _close(self) -> None:
        if self._source is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._source.stop(), 5)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), 5)
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5)


def _hint(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return {
            "hint": "the server's TLS certificate is not signed by the configured CA "
            "(sslrootcert / DATABASE_SSL_ROOT_CERT for PostgreSQL, KAFKA_SSL_CA_FILE for "
            "Kafka) or does not name the host connected to"
        }
    return {}


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."
