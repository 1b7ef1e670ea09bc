"""Retrying, in one place: what each failed try does to metrics, logs and readiness, how long
to wait before the next, and the graceful shutdown every such wait gives way to.

``policy`` judges a failure (pure); ``Retries`` acts on the judgement: it counts the retry,
marks the database unreachable, says in ``/readyz`` why the worker is not ready, and logs a
transient failure at every try but a standing fault once a minute (a wrong password would
otherwise log ten lines a second for hours). A standing fault is retried slowly.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable

import structlog
from aiokafka.errors import KafkaError

from ingest.pipeline.policy import Backoff, Disposition, classify, sqlstate_class
from ingest.service import metrics
from ingest.service.probes import Health

# Logged as the worker: these lines are the worker's, whichever module holds the code.
log = structlog.get_logger("ingest.worker")

STANDING_LOG_EVERY_S = 60.0
STANDING_RETRY_MIN_S = 5.0
# Of the shutdown timeout, kept for leaving the group and closing connections.
CLOSE_RESERVE_S = 3.0


class ShutdownRequested(Exception):
    """Raised out of a retry loop when the shutdown deadline has passed."""


class Shutdown:
    """A graceful stop: asked for once, it sets a deadline that every wait gives way to."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.stopping = asyncio.Event()
        self.deadline: float | None = None

    def request(self) -> None:
        """Begin a graceful shutdown (the deadline is ``timeout_s`` from now)."""
        if not self.stopping.is_set():
            log.info("shutdown requested", timeout_s=self.timeout_s)
            self.deadline = time.monotonic() + self.timeout_s
            self.stopping.set()

    def budget_s(self) -> float:
        """What is left of the deadline for finishing work (at least 0.1 s), less the reserve
        for leaving the group; only once a shutdown was requested."""
        assert self.deadline is not None
        return max(0.1, self.deadline - time.monotonic() - CLOSE_RESERVE_S)

    async def sleep(self, delay: float) -> bool:
        """Sleep ``delay`` s or until a shutdown is requested; True if one was."""
        try:
            await asyncio.wait_for(self.stopping.wait(), delay)
        except TimeoutError:
            return False
        return True

    async def sleep_before_retry(self, delay: float) -> None:
        """Sleep ``delay`` s; give up (ShutdownRequested) when the shutdown deadline nears."""
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            deadline = self.deadline
            if deadline is not None and time.monotonic() >= deadline - CLOSE_RESERVE_S:
                raise ShutdownRequested
            await asyncio.sleep(min(left, 0.2))


class Retries:
    """Notes each failed try of the database or the broker and says how long to wait."""

    def __init__(
        self,
        health: Health,
        max_backoff_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._health = health
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._last_standing_log = -STANDING_LOG_EVERY_S

    def backoff(self) -> Backoff:
        """A fresh backoff for one series of tries."""
        return Backoff(cap_s=self._max_backoff_s)

    def delay_after(self, exc: BaseException, backoff: Backoff, target: str | None = None) -> float:
        """Note the failure and return the wait before the next try: the backoff's next
        delay, and at least ``STANDING_RETRY_MIN_S`` for a standing fault."""
        delay = backoff.next_delay()
        if self.note(exc, target) is Disposition.STANDING:
            delay = max(delay, STANDING_RETRY_MIN_S)
        return delay

    def note(self, exc: BaseException, target: str | None = None) -> Disposition:
        """Count, log and show in readiness one failed try against ``target`` ("database"
        or "kafka"; by default judged from the error)."""
        disposition = classify(exc)
        target = target or ("kafka" if isinstance(exc, KafkaError) else "database")
        metrics.RETRIES.labels(target).inc()
        if target == "database":
            metrics.DB_ERRORS.labels(sqlstate_class(exc)).inc()
            self._health.database_ok = False
        if disposition is Disposition.STANDING:
            self._health.not_ready_because = f"standing fault: {type(exc).__name__}"
            now = self._clock()
            if now - self._last_standing_log >= STANDING_LOG_EVERY_S:
                self._last_standing_log = now
                log.error(
                    "standing fault; consumption paused until it is fixed",
                    target=target,
                    error=short_error(exc),
                    **error_hint(exc),
                )
        else:
            self._health.not_ready_because = f"retrying after {type(exc).__name__}"
            log.warning("transient failure; retrying", target=target, error=short_error(exc))
        return disposition

    def succeeded(self) -> None:
        """A write was stored: the database answers and nothing holds readiness back."""
        self._health.database_ok = True
        self._health.not_ready_because = None


def error_hint(exc: BaseException) -> dict[str, str]:
    """A ``hint`` log field for failures whose cure is not obvious from the error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return {
            "hint": "the server's TLS certificate is not signed by the configured CA "
            "(sslrootcert / DATABASE_SSL_ROOT_CERT for PostgreSQL, KAFKA_SSL_CA_FILE for "
            "Kafka) or does not name the host connected to"
        }
    return {}


def short_error(exc: BaseException) -> str:
    """The error's type and message, cut to 300 characters for a log line."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."
