"""The dead-letter circuit breaker: stop consuming when most records are going to the
dead-letter topic, instead of flooding it after a bad producer deploy.

It opens when, over the last ``window`` records (at least ``min_records`` of them), the
share dead-lettered exceeds ``max_ratio``, or when ``max_consecutive`` records in a row
were dead-lettered. While open, the worker pauses every partition and ``/readyz`` answers
503. It closes after ``cooldown_s`` (0: never by itself) or when an operator resets it
(``POST /breaker/reset``); closing forgets the window, so a flood that goes on opens it
again after another ``min_records``. ``DeadLetterBreaker`` is pure (the caller supplies
the clock); ``BreakerHold`` applies it to the worker.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from ingest.service import metrics

if TYPE_CHECKING:
    from ingest.pipeline.source import EventSource
    from ingest.service.probes import Health

# Logged as the worker: these lines are the worker's, whichever module holds the code.
log = structlog.get_logger("ingest.worker")


@dataclass(slots=True)
class DeadLetterBreaker:
    """Counts outcomes per batch and says whether consumption must stop."""

    window: int = 1000
    max_ratio: float = 0.5
    min_records: int = 100
    max_consecutive: int = 1000
    cooldown_s: float = 300.0
    _batches: deque[tuple[int, int]] = field(default_factory=deque)
    _records: int = 0
    _dead: int = 0
    _consecutive: int = 0
    opened_at: float | None = None
    reason: str = ""

    @property
    def is_open(self) -> bool:
        """True while consumption must stay stopped."""
        return self.opened_at is not None

    def record(self, outcomes: list[bool], now: float) -> bool:
        """Add one batch's outcomes in order (True = dead-lettered); return True if it opened."""
        if self.is_open or not outcomes:
            return False
        dead = sum(outcomes)
        self._batches.append((len(outcomes), dead))
        self._records += len(outcomes)
        self._dead += dead
        while len(self._batches) > 1 and self._records - self._batches[0][0] >= self.window:
            n, d = self._batches.popleft()
            self._records -= n
            self._dead -= d
        if not dead:
            self._consecutive = 0  # a batch without dead letters needs no walk
        else:
            for is_dead in outcomes:
                self._consecutive = self._consecutive + 1 if is_dead else 0
                if self._consecutive >= self.max_consecutive:
                    return self._open(now, f"{self._consecutive} dead letters in a row")
        if self._records >= self.min_records and self._dead / self._records > self.max_ratio:
            return self._open(
                now, f"{self._dead} of the last {self._records} records dead-lettered"
            )
        return False

    def _open(self, now: float, reason: str) -> bool:
        self.opened_at = now
        self.reason = reason
        return True

    def due_to_close(self, now: float) -> bool:
        """True when the cooldown has passed (never with a cooldown of 0)."""
        return (
            self.opened_at is not None
            and self.cooldown_s > 0
            and now - self.opened_at >= self.cooldown_s
        )

    def reset(self) -> None:
        """Close and forget the window."""
        self._batches.clear()
        self._records = self._dead = self._consecutive = 0
        self.opened_at = None
        self.reason = ""


class BreakerHold:
    """What the breaker's state does to the worker: open, every partition is paused,
    ``/readyz`` fails and the gauge is 1; closed (by the cooldown or an operator), they are
    undone."""

    def __init__(self, breaker: DeadLetterBreaker, health: Health) -> None:
        self.breaker = breaker
        self._health = health

    def record(self, outcomes: list[bool], src: EventSource) -> None:
        """Add one stored batch's outcomes (True = dead-lettered); open if they say so."""
        if self.breaker.record(outcomes, time.monotonic()):
            self._health.breaker_open = self.breaker.reason
            metrics.BREAKER_OPEN.set(1)
            src.pause()
            log.error(
                "dead-letter breaker open: consumption stopped",
                why=self.breaker.reason,
                closes_after_s=self.breaker.cooldown_s or None,
                reset="POST /breaker/reset",
            )

    async def wait(self, src: EventSource) -> list[Any]:
        """One turn of the loop while open: close when the cooldown has passed, else poll
        (the partitions are paused) so that the consumer stays in its group; returns what
        that poll brought."""
        if self.breaker.due_to_close(time.monotonic()):
            self.close(src)
            return []
        return await src.fetch(timeout_ms=500, max_records=1)

    def close(self, src: EventSource | None) -> str:
        """Close the breaker (cooldown or operator); consumption resumes. Says what it did."""
        was = self.breaker.reason
        self.breaker.reset()
        self._health.breaker_open = None
        metrics.BREAKER_OPEN.set(0)
        if src is not None and src.paused:
            src.resume()
        if was:
            log.warning("dead-letter breaker closed; consuming again", was=was)
            return f"breaker closed (was open: {was})"
        return "breaker was not open"
