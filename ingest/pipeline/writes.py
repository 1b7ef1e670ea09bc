"""The batch write in flight: one at a time, run as a task while the next batch is fetched
and decoded; retried per ``policy`` until stored; waited for with backpressure; and ended,
rolled back, when the shutdown deadline passes.

Backpressure: a write that retries or takes long pauses every partition while the consumer
keeps polling, so it stays in its group however long the write takes, and memory stays
bounded. A quick write is waited for without pausing: a pause makes aiokafka drop what it
has prefetched for those partitions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from ingest.pipeline.breaker import DeadLetterBreaker
from ingest.pipeline.connections import Connections
from ingest.pipeline.policy import is_retryable
from ingest.pipeline.retry import Retries, Shutdown, short_error
from ingest.pipeline.sink import Item, PositionsMovedBack, WriteResult
from ingest.service import metrics
from ingest.service.probes import Health

# Logged as the worker: these lines are the worker's, whichever module holds the code.
log = structlog.get_logger("ingest.worker")

# A write in flight longer than this pauses the partitions (backpressure).
PAUSE_AFTER_S = 2.0

# Given the positions an operator moved back and the batch, reads again from them and
# returns the batch without the records of those partitions.
OnReset = Callable[[dict[tuple[str, int], int], list[Item]], list[Item]]


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """A batch the database stored: what was written, and how long the write took."""

    items: list[Item]
    result: WriteResult
    write_s: float

    def outcomes(self) -> list[bool]:
        """Per record, in order: True if it was dead-lettered (for the breaker)."""
        dead = {dl.ref for dl in self.result.dead_letters}
        return [i.ref in dead for i in self.items] if dead else [False] * len(self.items)

    def report(self, commit_s: float) -> None:
        """Metrics and log lines of the stored batch (``commit_s``: its Kafka commit)."""
        items, result = self.items, self.result
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
            write_ms=round(self.write_s * 1000, 1),
            kafka_commit_ms=round(commit_s * 1000, 1),
        )


class InFlightWrite:
    """At most one batch write under way, and how the worker waits for it."""

    def __init__(
        self,
        connections: Connections,
        retries: Retries,
        shutdown: Shutdown,
        health: Health,
        breaker: DeadLetterBreaker,
        on_reset: OnReset,
    ) -> None:
        self._connections = connections
        self._retries = retries
        self._shutdown = shutdown
        self._health = health
        self._breaker = breaker
        self._on_reset = on_reset
        # Set while no database write is under way (a commit to Kafka may be).
        self.idle = asyncio.Event()
        self.idle.set()
        self._retrying = False
        self._task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        """True while a write started here has not finished (stored and committed)."""
        return self._task is not None and not self._task.done()

    def start(self, write: Coroutine[Any, Any, None]) -> None:
        """Run ``write`` (store a batch, then commit it) as the write in flight."""
        self._task = asyncio.create_task(write)

    async def wait(self, take_in: Callable[[list[Any]], None]) -> None:
        """Wait for the write in flight, if any, and raise what it raised. While it retries
        or takes long, pause the partitions and keep polling; ``take_in`` gets what those
        polls bring."""
        task, src = self._task, self._connections.source
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
                take_in(await src.fetch(timeout_ms=0, max_records=1))
                self._health.group_joined = src.joined
        self._task = None
        if paused_here and not self._breaker.is_open:
            src.resume()
        task.result()

    async def abandon(self) -> None:
        """End a write still in flight at shutdown: cancelled, its transaction rolls back
        with its discarded connection; its outcome is retrieved here, so that asyncio does
        not report it as "Task exception was never retrieved"."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.info("write in flight ended at shutdown", error=short_error(exc))

    async def store(self, items: list[Item]) -> StoredBatch | None:
        """Write ``items`` until the database stored them: the records of partitions no
        longer owned are left out (None if none is left), a retryable failure is retried
        after a backoff (ShutdownRequested when the deadline nears), and positions moved
        back by an operator are followed."""
        src, writer = self._connections.source, self._connections.writer
        assert src is not None
        assert writer is not None
        backoff = self._retries.backoff()
        self.idle.clear()
        partitions = {(i.ref.topic, i.ref.partition) for i in items}
        try:
            while True:
                owned = {(tp.topic, tp.partition) for tp in src.owned()}
                if not partitions <= owned:
                    items = [i for i in items if (i.ref.topic, i.ref.partition) in owned]
                    partitions &= owned
                if not items:
                    return None
                started = time.perf_counter()
                try:
                    # Bounded by INGEST_WRITE_TIMEOUT_S: a dead peer can leave a read hanging.
                    result = await writer.write(items)
                except PositionsMovedBack as moved:
                    items = self._on_reset(moved.positions, items)
                    continue
                except Exception as exc:
                    if not is_retryable(exc):
                        raise
                    self._retrying = True
                    delay = self._retries.delay_after(exc, backoff)
                    await self._shutdown.sleep_before_retry(delay)
                    continue
                took = time.perf_counter() - started
                metrics.BATCH_WRITE_SECONDS.observe(took)
                break
        finally:
            self.idle.set()
            self._retrying = False
        self._retries.succeeded()
        return StoredBatch(items, result, took)
