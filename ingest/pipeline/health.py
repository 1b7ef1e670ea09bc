"""Keeps the probes' ``Health`` current from the worker's side: a heartbeat on the worker's
event loop, a database ping while no write is under way, the pool gauges, and what the
source knows about the group, held partitions and stalls.

``ingest.service.probes`` serves what ``Health`` holds; this module is what feeds it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from ingest.pipeline.connections import Connections
from ingest.pipeline.retry import short_error
from ingest.pipeline.source import EventSource
from ingest.service import metrics
from ingest.service.probes import Health

# Logged as the worker: these lines are the worker's, whichever module holds the code.
log = structlog.get_logger("ingest.worker")

# Seconds between pings of the database, and the bound of each.
PING_EVERY_S = 5


class HealthWatch:
    """Feeds ``Health`` from the connections and the source."""

    def __init__(self, health: Health, connections: Connections, idle: Callable[[], bool]) -> None:
        """``idle`` says whether no write is under way (a write proves the database itself)."""
        self._health = health
        self._connections = connections
        self._idle = idle

    async def heartbeat(self) -> None:
        """Beat every second, forever (run as a task; cancel it to stop)."""
        # Liveness: this task runs on the same loop as the work; if the loop is blocked,
        # /healthz itself cannot answer, which is what a liveness probe should see.
        tick = 0
        while True:
            self._health.beat()
            self._report_pool()
            metrics.READY.set(int(self._health.ready()[0]))
            if tick % PING_EVERY_S == 0 and self._connections.writer is not None and self._idle():
                await self._ping()
            tick += 1
            await asyncio.sleep(1)

    async def after_fetch(self, src: EventSource) -> None:
        """After a fetch: the group, the held partitions (checked again when due) and the
        stalled ones, as readiness reports them."""
        self._health.group_joined = src.joined
        await src.recheck_held()
        self._health.positions_mismatch = src.held_reason()
        self._health.stalled = [stall.describe() for stall in src.stalls.values()]

    async def _ping(self) -> None:
        writer = self._connections.writer
        assert writer is not None
        try:
            await writer.ping(PING_EVERY_S)
        except Exception as exc:
            if self._health.database_ok:
                log.warning("database unreachable", error=short_error(exc))
            self._health.database_ok = False
        else:
            self._health.database_ok = True

    def _report_pool(self) -> None:
        pool = self._connections.pool
        if pool is not None:
            size, idle = pool.get_size(), pool.get_idle_size()
            metrics.DB_POOL_CONNECTIONS.labels("in_use").set(size - idle)
            metrics.DB_POOL_CONNECTIONS.labels("idle").set(idle)
