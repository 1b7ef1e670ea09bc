"""Every metric ingest exports, defined in one place (names follow Prometheus conventions).

Label values are bounded: topics and partitions come from configuration and the broker,
reasons from ``deadletter.REASONS``, SQLSTATE classes from ``policy.sqlstate_class``.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ingest import __version__


class BatchHistogram(Collector):
    """A histogram observed a batch of values at a time (exported like ``Histogram``).

    ``Histogram.observe`` takes a lock and walks the buckets in Python for each value; one
    call per stored event cost about 1.3 us of the worker's CPU per event. Here a batch is
    counted with C-level bisection and added under the lock once."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = [float(b) for b in buckets]
        if self._bounds[-1] != math.inf:
            self._bounds.append(math.inf)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        """Count each value in its bucket (``le``: the least upper bound not below it)."""
        bounds = self._bounds
        values = list(values)
        tally = Tally(bisect_left(bounds, v) for v in values)
        total = sum(values)
        with self._lock:
            for i, n in tally.items():
                self._counts[i] += n
            self._sum += total

    def collect(self) -> Iterator[Metric]:
        """The cumulative buckets, count and sum, as Prometheus expects them."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, n in zip(self._bounds, counts, strict=True):
            running += n
            cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=cumulative, sum_value=total
        )


EVENTS_CONSUMED: Final = Counter("ingest_events_consumed", "Records read from Kafka.", ["topic"])
EVENTS_WRITTEN: Final = Counter("ingest_events_written", "Events stored in call_events.")
EVENTS_DEAD_LETTERED: Final = Counter(
    "ingest_events_dead_lettered", "Records sent to the dead-letter topic.", ["reason"]
)
EVENTS_DUPLICATE: Final = Counter(
    "ingest_events_duplicate",
    "Events dropped as repeats: their id was already stored at the same created_at or "
    "within INGEST_DEDUP_WINDOW of it.",
)
DEDUP_LOOK_BACK_SECONDS: Final = Histogram(
    "ingest_dedup_look_back_seconds",
    "Time of one batch's look-back for events stored within INGEST_DEDUP_WINDOW (batches "
    "with events of calls stored before them).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DEDUP_LOOK_BACK_EVENTS: Final = Counter(
    "ingest_dedup_look_back_events", "Events whose id the look-back asked the database about."
)
EVENTS_FENCED: Final = Counter(
    "ingest_events_fenced", "Records skipped because another owner had already stored them."
)
CALLS_TERMINATED: Final = Counter("ingest_calls_terminated", "Calls closed by a termination.")
BATCH_EVENTS: Final = Histogram(
    "ingest_batch_events",
    "Records per written batch.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000),
)
BATCH_WRITE_SECONDS: Final = Histogram(
    "ingest_batch_write_seconds",
    "Time to store one batch, transaction and dead letters included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EVENT_FRESHNESS_SECONDS: Final = BatchHistogram(
    "ingest_event_freshness_seconds",
    "Commit time minus the event's created_at.",
    # Fine below 2 s, where a healthy pipeline lives (p99 target 1 s); coarse above, for
    # backlogs and replays.
    buckets=(
        0.025,
        0.05,
        0.1,
        0.15,
        0.2,
        0.3,
        0.4,
        0.5,
        0.75,
        1,
        1.5,
        2,
        3,
        5,
        10,
        30,
        60,
        300,
        900,
        3600,
        21600,
        86400,
    ),
)
CONSUMER_LAG: Final = Gauge(
    "ingest_consumer_lag_records",
    "High watermark minus the next offset to store, per assigned partition.",
    ["topic", "partition"],
)
PARTITIONS_ASSIGNED: Final = Gauge("ingest_partitions_assigned", "Partitions this replica owns.")
PARTITIONS_PAUSED: Final = Gauge("ingest_partitions_paused", "Partitions paused by backpressure.")
DB_POOL_CONNECTIONS: Final = Gauge(
    "ingest_db_pool_connections", "Database pool connections by state.", ["state"]
)
DB_ERRORS: Final = Counter(
    "ingest_db_errors", "Database errors by SQLSTATE class.", ["sqlstate_class"]
)
DB_CONNECTIONS_DISCARDED: Final = Counter(
    "ingest_db_connections_discarded",
    "Pool connections terminated instead of reused: their session failed or was ended.",
)
DB_SESSIONS_ENDED: Final = Counter(
    "ingest_db_sessions_ended",
    "Server sessions of exchanges that ran past their time limit, ended from another "
    "connection (pg_terminate_backend), by result: ended, gone (ended already), failed.",
    ["result"],
)
RETRIES: Final = Counter("ingest_retries", "Retried operations by target.", ["target"])
OFFSET_RESETS: Final = Counter(
    "ingest_offset_resets",
    "Partitions whose position was out of range on the broker and was reset to the earliest.",
    ["topic"],
)
POSITION_MISMATCHES: Final = Counter(
    "ingest_position_mismatches",
    "Assigned partitions whose stored position does not fit the topic (recreated, another "
    "cluster): held, nothing read, until the position is reset.",
    ["topic"],
)
PARTITIONS_HELD: Final = Gauge(
    "ingest_partitions_held", "Partitions held because their stored position does not fit."
)
PARTITIONS_AT_RETENTION_GAP: Final = Gauge(
    "ingest_partitions_at_retention_gap",
    "Partitions held because records between their stored position and the broker's log "
    "start were deleted before they were stored (INGEST_ON_RETENTION_GAP=hold); part of "
    "ingest_partitions_held.",
)
PARTITIONS_STALLED: Final = Gauge(
    "ingest_partitions_stalled",
    "Partitions stopped at a record batch that cannot be decoded (corrupt, or unknown codec).",
)
UNDECODABLE_BATCHES: Final = Counter(
    "ingest_undecodable_batches",
    "Record batches that could not be decoded; each stalls its partition.",
    ["topic"],
)
BREAKER_OPEN: Final = Gauge(
    "ingest_dlq_breaker_open", "1 while the dead-letter circuit breaker stops consumption."
)
READY: Final = Gauge("ingest_ready", "1 while /readyz answers 200.")
BUILD_INFO: Final = Info("ingest_build", "Build information.")
BUILD_INFO.info({"version": __version__})
