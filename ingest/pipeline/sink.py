"""The sink: writes one batch into PostgreSQL in one transaction; owns the worker's SQL.

Per batch, in one transaction:

1. lock this group's stored positions of the batch's partitions (``ingest_consumer_offsets``)
   and drop records below them: another owner already stored them (the fence);
2. dead-letter initiations naming a missing agent and events of calls that do not exist;
3. drop repeats within the batch (first wins): the same ``id`` at the same ``created_at``
   or, with a dedup window, within the window of it; then, with a dedup window, the
   look-back: drop the events of calls stored before the batch whose ``id`` is stored
   within the window of their ``created_at`` (one query per batch naming a time range, so
   TimescaleDB reads only the chunks in it);
4. in a savepoint: COPY the calls begun in this batch (with what the batch's answers and
   terminations did to them), COPY the events (a key stored before fails the COPY: the
   savepoint rolls back and the events go again by ``INSERT ... ON CONFLICT (id,
   created_at) DO NOTHING``, which drops those as repeats; either way the check is the
   key's own index, in the one chunk that holds that time, so its cost does not grow with
   history), UPDATE calls that already existed for the events actually inserted; on a data
   error (SQLSTATE 22/23) bisect until the offending records are isolated;
5. publish the dead letters and wait for the broker's acknowledgement;
6. advance the stored positions past the whole batch, then COMMIT.

Only after that commit may the Kafka offsets move on.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast
from uuid import UUID

import asyncpg
import structlog

from ingest.pipeline.contract import CallEvent, RecordRef, Rejection
from ingest.pipeline.deadletter import (
    DB_REJECTED,
    UNKNOWN_AGENT,
    UNKNOWN_CALL,
    DeadLetter,
    DeadLetterPublisher,
)
from ingest.pipeline.policy import (
    Disposition,
    classify,
    session_may_linger,
    sqlstate_class,
    sqlstate_of,
)
from ingest.pipeline.positions import StoredPosition, fingerprint
from ingest.pipeline.positions import load as load_stored_positions
from ingest.pipeline.sessions import end_session
from ingest.service import metrics

log = structlog.get_logger("ingest.sink")

TopicPartitionKey = tuple[str, int]
REPLAN_EVERY_S = 5.0
# A young session re-plans sooner: half its age, from this on, up to REPLAN_EVERY_S.
REPLAN_FIRST_S = 0.2
# After a batch held events stored before, the next batches skip the COPY attempt: a
# producer that repeats itself would otherwise make every batch pay a failed COPY first.
INSERT_ONLY_AFTER_REPEATS = 20
# An exchange past its time limit has its connection terminated at once; a wait that is not
# on the connection (the dead letters' acknowledgements) is cancelled this much later.
ABANDON_GRACE_S = 1.0
# Bound of ending, from another connection, a session given up on (``_end_lost``).
END_SESSION_TIMEOUT_S = 3.0
# Bound of the check of a pooled connection after a session was lost (``_acquire``).
CHECK_TIMEOUT_S = 1.0

_LOCK_POSITIONS = """
INSERT INTO ingest_consumer_offsets AS o (consumer_group, topic, partition, next_offset)
SELECT $1, v.topic, v.partition, 0
FROM unnest($2::text[], $3::int[]) AS v(topic, partition)
ORDER BY v.topic, v.partition
ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET next_offset = o.next_offset
RETURNING o.topic, o.partition, o.next_offset
"""

# With each position, the fingerprint of the record just below it (``positions.fingerprint``):
# checked on assignment, so a recreated topic is not read from a stale position.
_ADVANCE_POSITIONS = """
UPDATE ingest_consumer_offsets AS o
SET next_offset = v.next_offset, last_record_fingerprint = v.fingerprint, updated_at = now()
FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bytea[])
     AS v(topic, partition, next_offset, fingerprint)
WHERE o.consumer_group = $1 AND o.topic = v.topic AND o.partition = v.partition
  AND o.next_offset < v.next_offset
"""

# No lookup of stored events per batch: a lookup by id names no time, so on a hypertable
# it probes every chunk (and decompresses compressed ones). The key's unique index decides
# instead, in the chunk of each row's own time: a binary COPY first (the cheapest write, for
# the client and the server; a stored key fails it with a unique violation), and when the
# batch holds events stored before, the same binary COPY into a temporary table of the
# session and one INSERT ... SELECT from it that skips them and returns only the keys it
# skipped. Per 5,000-event batch that costs the client what the plain COPY does, where the
# INSERT from five arrays it replaced cost about 3 us more per event and learning which
# keys were stored (RETURNING every inserted key) about 7 us more; the server takes
# 0.8-1.0 of the plain COPY's rate for it (docs/performance-log.md), so fresh batches keep the
# plain COPY.
_EVENT_COLUMNS = ("id", "call_id", "event_type", "event_data", "created_at")
_STAGED_EVENTS = "ingest_staged_events"
# Created by the first batch of a session that needs it (in that batch's savepoint: rolled
# back with it, and made again next time); a session of its own, not a pooler's shared
# one, as the worker's prepared statements already need. Emptied at each commit.
_CREATE_STAGED_EVENTS = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGED_EVENTS} (
    id uuid, call_id uuid, event_type text, event_data jsonb, created_at timestamptz
) ON COMMIT DELETE ROWS
"""
# The DELETE empties the staging table within the transaction: a bisected batch stages
# each of its parts in turn, and a part's rows would otherwise still be there for the next.
_INSERT_STAGED_EVENTS = f"""
WITH staged AS (
    DELETE FROM {_STAGED_EVENTS}
    RETURNING id, call_id, event_type, event_data, created_at
), inserted AS (
    INSERT INTO call_events AS e (id, call_id, event_type, event_data, created_at)
    SELECT id, call_id, event_type, event_data, created_at FROM staged
    ON CONFLICT (id, created_at) DO NOTHING
    RETURNING e.id, e.created_at
)
SELECT s.id, s.created_at
FROM staged AS s
LEFT JOIN inserted AS i ON i.id = s.id AND i.created_at = s.created_at
WHERE i.id IS NULL
"""
# The look-back: the ids of the batch stored within the dedup window around its times. The
# time range is what keeps it cheap with history: TimescaleDB excludes every chunk outside
# it (at plan time, or at executor startup for a generic plan, since the bounds are
# parameters), so only the recent, uncompressed chunks are read. Within them, one probe of
# the key's index per id (a nested loop: OFFSET 0 keeps the planner from flattening the
# subquery), whatever the range holds. ``id = ANY($1) AND created_at BETWEEN ...`` read
# every row of the range instead, and in a generic plan (the sixth run of a prepared
# statement on) compared each with the whole array: 1.5-2.4 s per 5,000 ids over 50,000
# rows; a plain join with unnest was hashed, reading the whole range each batch.
_RECENT_IDS = """
SELECT v.id, e.created_at
FROM unnest($1::uuid[]) AS v(id)
CROSS JOIN LATERAL (
    SELECT c.created_at FROM call_events AS c
    WHERE c.id = v.id AND c.created_at >= $2 AND c.created_at <= $3
    OFFSET 0
) AS e
"""
# The same probe on plain PostgreSQL, the range given as a row comparison on the key, which
# only the key's index can serve (with ``c.id = v.id`` for the estimate: the key's index is
# the only one on ``id``). With ``created_at >= $2 AND created_at <= $3`` the planner
# may take the created_at index instead and filter each id: its statistics of a large table
# lag behind the newest day (autoanalyze waits for a tenth of the table to change: weeks at
# a year of history), so the newest day looks empty, and each probe then read every index
# entry of the range, live or dead. Seen on the bench's year of history: 3.9 ms per id, 20 s
# per 5,000-id batch, every write past INGEST_WRITE_TIMEOUT_S: nothing stored any more. A
# hypertable keeps ``_RECENT_IDS``: its chunk exclusion needs the range on the column itself,
# and each chunk's statistics are its own (the newest day's chunk is analyzed as it fills).
_RECENT_IDS_BY_KEY = """
SELECT v.id, e.created_at
FROM unnest($1::uuid[]) AS v(id)
CROSS JOIN LATERAL (
    SELECT c.created_at FROM call_events AS c
    WHERE c.id = v.id
      AND (c.id, c.created_at) >= (v.id, $2) AND (c.id, c.created_at) <= (v.id, $3)
    OFFSET 0
) AS e
"""


@dataclass(frozen=True, slots=True)
class LookBack:
    """The look-back's statement, and whether each run plans it anew."""

    query: str
    # A statement of its own per run: planned for its bounds, never from the plan cache.
    # A cached statement's generic plan of a hypertable query names every chunk: building
    # it opens them all (about 100 ms per session at a year of daily chunks, compressed
    # ones with theirs) and each run of it locks them all at executor startup, where a plan
    # for the bounds at hand names the few chunks in range. Two more round trips per batch
    # (prepare, and closing the previous batch's statement) cost less.
    planned_each_time: bool

    async def fetch(
        self, conn: asyncpg.Connection, ids: list[UUID], low: datetime, high: datetime
    ) -> list[asyncpg.Record]:
        """The stored ``(id, created_at)`` of ``ids`` between ``low`` and ``high``."""
        if not self.planned_each_time:
            return cast(list[asyncpg.Record], await conn.fetch(self.query, ids, low, high))
        statement = await conn.prepare(self.query)
        return cast(list[asyncpg.Record], await statement.fetch(ids, low, high))


HYPERTABLE_LOOK_BACK = LookBack(_RECENT_IDS, planned_each_time=True)
TABLE_LOOK_BACK = LookBack(_RECENT_IDS_BY_KEY, planned_each_time=False)
_HAS_HYPERTABLE_VIEW = "SELECT to_regclass('timescaledb_information.hypertables') IS NOT NULL"
_IS_HYPERTABLE = """
SELECT EXISTS (
    SELECT 1 FROM timescaledb_information.hypertables
    WHERE hypertable_name = 'call_events' AND hypertable_schema = current_schema()
)
"""
# The time ranges of call_events' chunks (TimescaleDB), for ``ChunkRanges``.
_CHUNK_RANGES = """
SELECT range_start, range_end FROM timescaledb_information.chunks
WHERE hypertable_name = 'call_events' AND hypertable_schema = current_schema()
ORDER BY range_start
"""
# Taken first, before the batch writes ``calls``, by a batch that may create a chunk.
# TimescaleDB creates a chunk inside the inserting transaction: it locks the hypertable
# (SHARE UPDATE EXCLUSIVE) and then, to give the chunk the foreign key to ``calls``, takes
# SHARE ROW EXCLUSIVE on ``calls``, which waits for every transaction that has written
# ``calls`` (ROW EXCLUSIVE). A concurrent batch that has written ``calls`` and then inserts
# into the same new chunk waits for the hypertable lock: a deadlock, every time two writers
# (two lanes, two replicas) begin a new chunk together (20 of 20 new days with two
# writers). Holding the ``calls`` lock before writing ``calls`` breaks the cycle: a creator
# then waits only for batches that do not wait for it.
_LOCK_CALLS_FOR_A_NEW_CHUNK = "LOCK TABLE calls IN SHARE ROW EXCLUSIVE MODE"


class ChunkRanges:
    """The ``[start, end)`` time ranges of the hypertable's chunks that this writer knows of
    (read from the server when a batch falls outside them)."""

    def __init__(self, ranges: Sequence[tuple[datetime, datetime]] = ()) -> None:
        self._starts = [r[0] for r in ranges]
        self._ends = [r[1] for r in ranges]

    def hold(self, times: Sequence[datetime], low: datetime, high: datetime) -> bool:
        """Whether every one of ``times`` (between ``low`` and ``high``) lies in a known
        chunk. Contiguous known chunks from ``low``'s to ``high``'s answer without looking
        at each time (the common case: a batch within a day or two)."""
        i = bisect.bisect_right(self._starts, low) - 1
        if i < 0 or low >= self._ends[i]:
            return False
        while high >= self._ends[i]:
            if i + 1 == len(self._starts) or self._starts[i + 1] != self._ends[i]:
                return all(self._holds(t) for t in times)
            i += 1
        return True

    def _holds(self, t: datetime) -> bool:
        i = bisect.bisect_right(self._starts, t) - 1
        return i >= 0 and t < self._ends[i]

    @classmethod
    async def load(cls, conn: asyncpg.Connection) -> ChunkRanges:
        """The chunks of ``call_events`` as the server has them now."""
        return cls([(r[0], r[1]) for r in await conn.fetch(_CHUNK_RANGES)])


# INGEST_DEDUP_WINDOW's default.
DEFAULT_DEDUP_WINDOW = timedelta(hours=24)
_EXISTING_CALLS = "SELECT id FROM calls WHERE id = ANY($1::uuid[])"
_EXISTING_AGENTS = "SELECT id FROM agents WHERE id = ANY($1::uuid[])"

_ANSWER_CALLS = """
UPDATE calls AS c SET status = 'in_progress', updated_at = now()
FROM unnest($1::uuid[]) AS u(id)
WHERE c.id = u.id AND c.status = 'initiated' AND c.ended_at IS NULL
"""

# A call with ended_at set is terminated: later terminations (and answers) leave it alone.
_TERMINATE_CALLS = """
UPDATE calls AS c SET
    status = t.status,
    ended_at = t.ended_at,
    duration = COALESCE(make_interval(secs => t.duration_s), t.ended_at - c.created_at),
    recording_url = COALESCE(t.recording_url, c.recording_url),
    transcript = COALESCE(t.transcript, c.transcript),
    sentiment_score = COALESCE(t.sentiment_score, c.sentiment_score),
    cost_cents = COALESCE(t.cost_cents, c.cost_cents),
    updated_at = now()
FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::float8[], $5::text[], $6::text[],
            $7::float8[], $8::int4[])
     AS t(id, status, ended_at, duration_s, recording_url, transcript, sentiment_score,
          cost_cents)
WHERE c.id = t.id AND c.ended_at IS NULL
"""

# Rows locked in key order (``FOR NO KEY UPDATE`` under the ``ORDER BY``, before the
# update): two write lanes (``lanes``) whose batches touch the same agents then wait for one
# another instead of deadlocking. The lock does not conflict with the key-share locks that
# the calls' foreign key takes.
_TOUCH_AGENTS = """
WITH v AS (
    SELECT agent_id, max(used_at) AS used_at
    FROM unnest($1::uuid[], $2::timestamptz[]) AS u(agent_id, used_at)
    GROUP BY agent_id
), locked AS (
    SELECT a.id, v.used_at
    FROM agents AS a JOIN v ON a.id = v.agent_id
    WHERE a.last_used_at IS NULL OR a.last_used_at < v.used_at
    ORDER BY a.id
    FOR NO KEY UPDATE OF a
)
UPDATE agents AS a SET last_used_at = l.used_at
FROM locked AS l
WHERE a.id = l.id AND (a.last_used_at IS NULL OR a.last_used_at < l.used_at)
"""

_CALL_COLUMNS = (
    "id",
    "from_number",
    "to_number",
    "agent_id",
    "status",
    "created_at",
    "updated_at",
    "ended_at",
    "duration",
    "recording_url",
    "transcript",
    "sentiment_score",
    "cost_cents",
)


class Item(NamedTuple):
    """One consumed record with what decoding made of it (a named tuple: one per record)."""

    ref: RecordRef
    key: bytes | None
    value: bytes | None
    decoded: CallEvent | Rejection
    timestamp: int = -1  # the record's, for the fingerprint stored with the position


class SessionTimedOut(TimeoutError):
    """An exchange with the database ran past its time limit: its connection was terminated
    and its server session ended (transient, like any timeout)."""


class _Limit:
    """Terminates a connection when its exchange runs past ``limit_s``."""

    def __init__(self, conn: asyncpg.Connection, limit_s: float | None) -> None:
        self.expired = False
        # When a wait that is not on the connection is cancelled (loop time).
        self.backstop_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        if limit_s is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(limit_s, self._expire, conn)
            self.backstop_at = loop.time() + limit_s + ABANDON_GRACE_S

    def _expire(self, conn: asyncpg.Connection) -> None:
        self.expired = True
        _discard(conn)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _discard(conn: asyncpg.Connection) -> None:
    """Terminate a pooled connection; the pool opens a fresh one on the next acquire."""
    # Terminated already (by its time limit, or by asyncpg after a cancel request that got
    # no answer), the connection is back with the pool, and its proxy refuses every call.
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


class PositionsMovedBack(Exception):
    """Stored positions are behind where this writer's reads are: an operator moved them
    back (``ingest positions reset --force``) under a live worker. Nothing of the batch was
    stored; the reader must seek to ``positions`` (it would otherwise store past them)."""

    def __init__(self, positions: dict[TopicPartitionKey, int]) -> None:
        super().__init__(f"stored positions moved back: {positions}")
        self.positions = positions


@dataclass(slots=True)
class WriteResult:
    """What one committed batch did."""

    written: list[CallEvent] = field(default_factory=list)
    duplicates: int = 0
    fenced: int = 0
    terminated: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    positions: dict[TopicPartitionKey, int] = field(default_factory=dict)


def replan_due(now: float, first_seen: float, planned_at: float) -> bool:
    """Whether a session first seen at ``first_seen`` and last re-planned at ``planned_at``
    re-plans at ``now``: after half its age (at least ``REPLAN_FIRST_S``), at most every
    ``REPLAN_EVERY_S``."""
    interval = min(REPLAN_EVERY_S, max(REPLAN_FIRST_S, (now - first_seen) / 2))
    return now - planned_at >= interval


def _rows_updated(status: str) -> int:
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


def _dead(item: Item, reason: str, detail: str, sqlstate: str | None = None) -> DeadLetter:
    return DeadLetter(item.ref, item.key, item.value, reason, detail, sqlstate)


class BatchWriter:
    """Stores batches of consumed records for one consumer group, exactly once per event."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        group_id: str,
        publisher: DeadLetterPublisher,
        *,
        write_timeout_s: float | None = None,
        dedup_window: timedelta | None = DEFAULT_DEDUP_WINDOW,
    ) -> None:
        """``write_timeout_s`` bounds each batch write and each read of the positions (None:
        unbounded); see ``_session`` for what happens at the bound. ``dedup_window``: an
        event whose ``id`` is stored (or earlier in the batch) with a ``created_at`` within
        this of its own is a repeat (None: only the same ``(id, created_at)`` is)."""
        self._pool = pool
        self._group = group_id
        self._publisher = publisher
        self._write_timeout_s = write_timeout_s
        self._dedup_window = dedup_window
        # A session was lost: check pooled connections before use (``_acquire``).
        self._check_pooled = False
        # Per server process: (first seen, last re-planned).
        self._planned_at: dict[int, tuple[float, float]] = {}
        # Where this writer's reads continue per partition: the positions the reader sought
        # to (``reading_from``) or that its batches stored. Positions only move forward,
        # except by an operator's reset; one found behind this is such a reset.
        self._reading_from: dict[TopicPartitionKey, int] = {}
        self._insert_only_batches = 0
        # Whether call_events is a hypertable (asked once: the worker does not change what
        # the migrations made), and the chunks known to exist (``_may_create_chunk``).
        self._hypertable: bool | None = None
        self._chunks: ChunkRanges | None = None

    async def ping(self, timeout_s: float | None = None) -> None:
        """Raise unless the database answers (within ``timeout_s``)."""
        async with self._session(timeout_s) as conn:
            await conn.fetchval("SELECT 1")

    async def load_positions(self) -> dict[TopicPartitionKey, StoredPosition]:
        """The next offset to read per partition, as stored with the data."""
        async with self._session(self._write_timeout_s) as conn:
            return await load_stored_positions(conn, self._group)

    def reading_from(self, positions: dict[TopicPartitionKey, int]) -> None:
        """The reader sought to ``positions``: batches continue from there."""
        self._reading_from.update(positions)

    @contextlib.asynccontextmanager
    async def _session(
        self, limit_s: float | None = None, *, end_lost: bool = True
    ) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection that goes back to the pool only when its work succeeded,
        within ``limit_s`` (None: unbounded).

        A session PostgreSQL ended (failover, ``pg_terminate_backend``, an idle-session
        killer, a pooler) or an operation cut short by a timeout leaves the connection in an
        unknown protocol state; returning it to the pool runs a reset on it, which then fails
        with anything from ``ConnectionDoesNotExistError`` to ``InternalClientError``. So on
        any failure, cancellation included, the connection is terminated, never reset, and
        the next acquire opens a fresh one. After success, a failing reset is not the
        caller's failure: its work is done (a batch is committed), so it is logged only.

        At ``limit_s`` (the reset included) the connection is terminated where it stands,
        so every wait on it ends at once, and ``SessionTimedOut`` is raised. Cancelling the
        task instead made asyncpg send a cancel request and a ROLLBACK down a flow that may
        be gone and wait for them for another ``command_timeout``; by then asyncpg had
        terminated the connection itself, and terminating it again raised ``InterfaceError:
        cannot call Connection.terminate(): connection has been released back to the
        pool``. A wait that is not on the connection (the dead letters' acknowledgements)
        is cancelled ``ABANDON_GRACE_S`` later. Then, when the server may still hold the
        session (``policy.session_may_linger``: a black-holed flow carries no FIN, and a
        session inside a transaction keeps its locks on the positions), its server process
        is ended from another connection (``_end_lost``).
        """
        conn = await self._acquire()
        pid = conn.get_server_pid()
        limit = _Limit(conn, limit_s)
        try:
            async with asyncio.timeout_at(limit.backstop_at):
                yield conn
        except BaseException as exc:
            limit.cancel()
            _discard(conn)
            metrics.DB_CONNECTIONS_DISCARDED.inc()
            # Not on a cancellation (a shutdown): its deadline is not to be spent on this;
            # the session's own limits end it on the server.
            if limit.expired or (isinstance(exc, Exception) and session_may_linger(exc)):
                self._check_pooled = True
                if end_lost:
                    await self._end_lost(pid)
            if limit.expired and not isinstance(exc, asyncio.CancelledError):
                raise SessionTimedOut(
                    f"no answer from the database within {limit_s:g} s; session ended"
                ) from exc
            raise
        try:
            await self._pool.release(conn)
        except Exception as exc:
            # asyncpg has terminated the connection already; the pool replaces it.
            self._check_pooled = self._check_pooled or limit.expired
            metrics.DB_CONNECTIONS_DISCARDED.inc()
            metrics.DB_ERRORS.labels(sqlstate_class(exc)).inc()
            log.warning(
                "discarded a connection whose reset failed after its work succeeded",
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
        finally:
            limit.cancel()

    async def _acquire(self) -> asyncpg.Connection:
        """A pooled connection. After a session was lost, connections are checked first
        (``SELECT 1`` within ``CHECK_TIMEOUT_S``) until one answers: the other flows of the
        same path may have vanished with it, the pool hands out its open connections before
        it opens a new one, and each such connection would cost a whole time limit. One
        that does not answer is terminated; the pool opens a fresh one in its place."""
        attempts = self._pool.get_max_size() + 1
        while True:
            conn = await self._pool.acquire()
            if not self._check_pooled:
                return conn
            limit = _Limit(conn, CHECK_TIMEOUT_S)
            try:
                await conn.fetchval("SELECT 1")
            except BaseException as exc:
                _discard(conn)
                metrics.DB_CONNECTIONS_DISCARDED.inc()
                attempts -= 1
                if attempts == 0 or not isinstance(exc, Exception):
                    raise
                continue
            finally:
                limit.cancel()
            self._check_pooled = False
            return conn

    async def _end_lost(self, pid: int) -> None:
        """End server process ``pid``, whose session this writer gave up on, from another
        connection, so that its locks go now rather than when the server's timeouts
        (``sessions.SessionLimits``) end it. Bounded; a failure is logged, never raised."""
        try:
            async with self._session(END_SESSION_TIMEOUT_S, end_lost=False) as conn:
                ended = await end_session(conn, pid, END_SESSION_TIMEOUT_S / 2)
        except Exception as exc:
            metrics.DB_SESSIONS_ENDED.labels("failed").inc()
            log.warning(
                "could not end a database session given up on; the server's timeouts will",
                pid=pid,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            return
        result = "gone" if ended is None else "ended" if ended else "failed"
        metrics.DB_SESSIONS_ENDED.labels(result).inc()
        log.warning("ended a database session given up on", pid=pid, result=result)

    async def write(self, items: Sequence[Item]) -> WriteResult:
        """Store a batch in one transaction; return only once it has committed.

        Raises whatever PostgreSQL or the broker raised when the batch could not be
        committed; nothing of it is then stored, and the caller retries the same batch.
        """
        result = WriteResult()
        if not items:
            return result
        try:
            async with self._session(self._write_timeout_s) as conn:
                await self._refresh_plans(conn)
                async with conn.transaction():
                    result = await self._write_in(conn, items, result)
        except Exception:
            # A chunk this writer knew may be gone (retention): read them again next time.
            self._chunks = None
            raise
        self._reading_from.update(result.positions)
        self._publisher.forget(dl.ref for dl in result.dead_letters)
        return result

    async def _refresh_plans(self, conn: asyncpg.Connection) -> None:
        # Generic plans cached while a table was small (a fresh deployment, a truncate) go
        # on scanning it as it grows: batch writes grew from 100 to 270 ms in seven seconds
        # of steady load. Re-plan now and then; forcing custom plans instead costs a
        # per-element estimate of every 5,000-id array on every batch.
        # That includes the foreign-key checks' plans: a COPY into call_events on a fresh
        # database checks each row's call with a plan made when calls was empty (a sequential
        # scan), and its time grew from 40 to 220 ms per 1,200 events within five seconds.
        # So a young session re-plans after half its age (0.2 s, 0.4 s, ... up to 5 s).
        # Keyed by the server process: the pool hands out a new proxy object per acquire,
        # so id(conn) changed every batch and every batch paid DISCARD PLANS (and the map grew).
        now = time.monotonic()
        key = conn.get_server_pid()
        first, planned = self._planned_at.get(key, (now, -math.inf))
        if replan_due(now, first, planned):
            await conn.execute("DISCARD PLANS")
            self._planned_at = {
                k: v for k, v in self._planned_at.items() if now - v[1] < 10 * REPLAN_EVERY_S
            }
            self._planned_at[key] = (first, now)

    async def _write_in(
        self, conn: asyncpg.Connection, items: Sequence[Item], result: WriteResult
    ) -> WriteResult:
        first, last = _spans(items)
        positions = await self._lock_positions(conn, sorted(first))
        moved = {k: p for k, p in positions.items() if p < self._reading_from.get(k, p)}
        if moved:
            raise PositionsMovedBack(moved)
        live = items
        if any(first[k] < p for k, p in positions.items()):
            live = [i for i in items if i.ref.offset >= positions[(i.ref.topic, i.ref.partition)]]
        result.fenced = len(items) - len(live)

        events: list[Item] = []
        for item in live:
            if isinstance(item.decoded, Rejection):
                rej = item.decoded
                result.dead_letters.append(_dead(item, rej.reason, rej.detail))
            else:
                events.append(item)

        # Orphans first: a repeat only counts as one when its first copy can be stored.
        events, existing_calls = await self._drop_orphans(conn, events, result)
        events, repeats = _drop_batch_repeats(events, self._dedup_window)
        result.duplicates += sum(len(r) for r in repeats.values())
        if self._dedup_window is not None:
            # Before the calls are planned: only events actually inserted touch ``calls``.
            # It sees committed rows only: the same id written at this moment by another
            # partition's transaction with another created_at is not seen, and the key's
            # index does not stop it either (a limit, see docs/guarantees.md).
            look_back = await self._look_back(conn)
            events, recent = await _drop_recent_repeats(
                conn, events, self._dedup_window, existing_calls, look_back
            )
            result.duplicates += recent
        if events and await self._may_create_chunk(conn, events):
            await conn.execute(_LOCK_CALLS_FOR_A_NEW_CHUNK)
        copy = self._insert_only_batches == 0
        self._insert_only_batches = max(0, self._insert_only_batches - 1)
        stored = await self._store(conn, events, existing_calls, copy=copy)
        result.terminated = stored.terminated
        result.duplicates += stored.repeats
        result.dead_letters.extend(stored.rejected)
        result.dead_letters.extend(_repeats_of_rejected(events, stored.rejected, repeats, result))
        result.written = _events(stored.items)

        await self._publisher.publish(result.dead_letters)

        result.positions = {k: max(p, last[k].ref.offset + 1) for k, p in positions.items()}
        keys = sorted(result.positions)
        await conn.execute(
            _ADVANCE_POSITIONS,
            self._group,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [result.positions[k] for k in keys],
            [fingerprint(i.timestamp, i.key, i.value) for i in (last[k] for k in keys)],
        )
        return result

    async def _is_hypertable(self, conn: asyncpg.Connection) -> bool:
        """Whether call_events is a TimescaleDB hypertable (asked once)."""
        if self._hypertable is None:
            self._hypertable = bool(await conn.fetchval(_HAS_HYPERTABLE_VIEW)) and bool(
                await conn.fetchval(_IS_HYPERTABLE)
            )
        return self._hypertable

    async def _look_back(self, conn: asyncpg.Connection) -> LookBack:
        """The look-back for a hypertable or for a plain table."""
        return HYPERTABLE_LOOK_BACK if await self._is_hypertable(conn) else TABLE_LOOK_BACK

    async def _may_create_chunk(self, conn: asyncpg.Connection, events: list[Item]) -> bool:
        """Whether inserting ``events`` may create a chunk: some event's time lies in no
        chunk known to exist, also after reading the chunks again."""
        if not await self._is_hypertable(conn):
            return False
        times = [e.created_at for e in _events(events)]
        low, high = min(times), max(times)
        if self._chunks is not None and self._chunks.hold(times, low, high):
            return False
        self._chunks = await ChunkRanges.load(conn)
        return not self._chunks.hold(times, low, high)

    async def _lock_positions(
        self, conn: asyncpg.Connection, keys: list[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, int]:
        rows = await conn.fetch(
            _LOCK_POSITIONS, self._group, [k[0] for k in keys], [k[1] for k in keys]
        )
        return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}

    @staticmethod
    async def _drop_orphans(
        conn: asyncpg.Connection, events: list[Item], result: WriteResult
    ) -> tuple[list[Item], set[UUID]]:
        """Dead-letter unknown agents and calls; return the rest and the calls that exist."""
        evs = _events(events)
        agent_ids = {
            e.initiation.agent_id
            for e in evs
            if e.initiation is not None and e.initiation.agent_id is not None
        }
        known_agents: set[UUID] = set()
        if agent_ids:
            known_agents = {r["id"] for r in await conn.fetch(_EXISTING_AGENTS, list(agent_ids))}
        call_ids = {e.call_id for e in evs}
        existing: set[UUID] = set()
        if call_ids:
            existing = {r["id"] for r in await conn.fetch(_EXISTING_CALLS, list(call_ids))}
        known_calls = set(existing)

        kept: list[Item] = []
        for item, e in zip(events, evs, strict=True):
            if e.initiation is not None:
                agent = e.initiation.agent_id
                if agent is not None and agent not in known_agents:
                    result.dead_letters.append(
                        _dead(item, UNKNOWN_AGENT, f"agent_id: no agent {agent}")
                    )
                    continue
                known_calls.add(e.call_id)
            elif e.call_id not in known_calls:
                result.dead_letters.append(
                    _dead(item, UNKNOWN_CALL, f"call_id: no call {e.call_id} and no initiation")
                )
                continue
            kept.append(item)
        return kept, existing

    async def _store(
        self,
        conn: asyncpg.Connection,
        items: list[Item],
        existing_calls: set[UUID],
        copy: bool = True,
    ) -> _Stored:
        """Insert in a savepoint; on a data error, bisect to isolate the rejected records.

        Events whose key is already stored are not inserted and count as repeats. ``copy``:
        try a plain COPY of the events first (fails on a stored key, then they go again
        through the staging table, which skips the stored keys and names them).
        """
        if not items:
            return _Stored()
        try:
            async with conn.transaction():
                inserted, terminated = await self._insert(conn, items, existing_calls, copy)
        except _HoldsRepeats:
            # Rolled back: some events were stored before; insert again, learning which.
            # The next batches skip the plain COPY, even when none is found now (a
            # concurrent writer's row that a failed COPY saw and then rolled back).
            self._insert_only_batches = INSERT_ONLY_AFTER_REPEATS
            return await self._store(conn, items, existing_calls, copy=False)
        except _AlreadyStored as exc:
            # Rolled back: a stored repeat changed what the batch does to a call begun in it.
            self._insert_only_batches = INSERT_ONLY_AFTER_REPEATS
            rest = [i for i in items if _key(_event(i)) not in exc.keys]
            again = await self._store(conn, rest, existing_calls, copy)
            again.repeats += len(items) - len(rest)
            return again
        except asyncpg.PostgresError as exc:
            if classify(exc) is not Disposition.DATA:
                raise
            if len(items) == 1:
                detail = f"{type(exc).__name__}: {exc}"
                return _Stored(rejected=[_dead(items[0], DB_REJECTED, detail, sqlstate_of(exc))])
            mid = len(items) // 2
            a = await self._store(conn, items[:mid], existing_calls, copy)
            b = await self._store(conn, items[mid:], existing_calls, copy)
            return _Stored(
                a.items + b.items,
                a.rejected + b.rejected,
                a.terminated + b.terminated,
                a.repeats + b.repeats,
            )
        if len(inserted) < len(items):
            # Stored repeats keep coming: the next batches skip the plain COPY as well.
            self._insert_only_batches = INSERT_ONLY_AFTER_REPEATS
        return _Stored(inserted, [], terminated, len(items) - len(inserted))

    @staticmethod
    async def _insert(
        conn: asyncpg.Connection,
        items: list[Item],
        existing_calls: set[UUID],
        copy: bool,
    ) -> tuple[list[Item], int]:
        """Store events and their effects on calls; return the items inserted (the others
        were stored before) and how many calls they terminated.

        Calls begun in this batch get their final state in memory (answer, first
        termination) and are written once, by COPY; only calls that already existed take
        set-based UPDATEs, from the events actually inserted.
        """
        events = _events(items)
        plan = CallPlan.of(events, existing_calls)
        if plan.new_calls:
            await conn.copy_records_to_table(
                "calls", records=plan.new_call_rows(), columns=_CALL_COLUMNS
            )
        rows = [e[:5] for e in events]
        if copy:
            try:
                await conn.copy_records_to_table(
                    "call_events", records=rows, columns=_EVENT_COLUMNS
                )
            except asyncpg.UniqueViolationError:
                raise _HoldsRepeats from None
        else:
            await conn.execute(_CREATE_STAGED_EVENTS)
            await conn.copy_records_to_table(_STAGED_EVENTS, records=rows, columns=_EVENT_COLUMNS)
            stored_before = {(r[0], r[1]) for r in await conn.fetch(_INSERT_STAGED_EVENTS)}
            if stored_before:
                # An event of a call begun in this batch can be stored already only if a
                # producer reused an event key for another call; then redo without it.
                if any(_key(e) in stored_before for e in events if e.call_id in plan.new_calls):
                    raise _AlreadyStored(stored_before)
                items = [
                    i for i, e in zip(items, events, strict=True) if _key(e) not in stored_before
                ]
                events = _events(items)
                plan = CallPlan.of(events, existing_calls)
        if plan.answered:
            await conn.execute(_ANSWER_CALLS, plan.answered)
        if plan.agents_used:
            await conn.execute(
                _TOUCH_AGENTS, list(plan.agents_used), list(plan.agents_used.values())
            )
        terminated = plan.terminated_new
        if plan.terminations:
            rows_t = [
                (
                    e.call_id,
                    t.status,
                    e.created_at,
                    t.duration_seconds,
                    t.recording_url,
                    t.transcript,
                    t.sentiment_score,
                    t.cost_cents,
                )
                for e in plan.terminations
                if (t := e.termination) is not None
            ]
            status = await conn.execute(_TERMINATE_CALLS, *map(list, zip(*rows_t, strict=True)))
            terminated += _rows_updated(status)
        return items, terminated


EventKey = tuple[UUID, datetime]


def _key(e: CallEvent) -> EventKey:
    """The table's key of an event: a repeat is a second event with the same key."""
    return (e.id, e.created_at)


@dataclass(slots=True)
class _Stored:
    """What one savepoint (or a bisected part of it) stored."""

    items: list[Item] = field(default_factory=list)
    rejected: list[DeadLetter] = field(default_factory=list)
    terminated: int = 0
    repeats: int = 0


class _HoldsRepeats(Exception):
    """Raised inside a savepoint when some events were stored before: roll back, and insert
    again asking which."""


class _AlreadyStored(Exception):
    """Raised inside a savepoint to roll it back and store again without these keys."""

    def __init__(self, keys: set[EventKey]) -> None:
        super().__init__(f"{len(keys)} event keys already stored")
        self.keys = keys


def _drop_batch_repeats(
    events: list[Item], window: timedelta | None = None
) -> tuple[list[Item], dict[EventKey, list[Item]]]:
    """Drop later copies of an event within the batch (first wins): the same ``id`` with a
    ``created_at`` within ``window`` of a kept copy's (None: the same ``created_at``).
    Return the rest, and the dropped copies by the key of the copy they repeat."""
    # Distinct ids: no repeats (the common case, checked cheaply: by the ids' 16 bytes, since
    # the first hash of one of asyncpg's UUIDs builds an int for it, 457 ns against 89).
    if len({i.decoded.id.bytes for i in events}) == len(events):  # type: ignore[union-attr]
        return events, {}
    span = window or timedelta(0)
    kept: dict[UUID, list[CallEvent]] = {}
    unique: list[Item] = []
    repeats: dict[EventKey, list[Item]] = {}
    for item in events:
        e = _event(item)
        firsts = kept.setdefault(e.id, [])
        first = next((f for f in firsts if abs(e.created_at - f.created_at) <= span), None)
        if first is not None:
            repeats.setdefault(_key(first), []).append(item)
        else:
            firsts.append(e)
            unique.append(item)
    return unique, repeats


async def _drop_recent_repeats(
    conn: asyncpg.Connection,
    events: list[Item],
    window: timedelta,
    existing_calls: set[UUID],
    look_back: LookBack,
) -> tuple[list[Item], int]:
    """Drop the events whose ``id`` is stored with a ``created_at`` within ``window`` of
    theirs; return the rest and how many were dropped.

    Only events of ``existing_calls`` (the calls stored before this batch) are looked up: a
    call begun in this batch has no stored events yet (each stored event names a stored
    call), so its events cannot repeat a stored one. The window applies both ways around
    each event's time: a retry usually carries a later ``created_at`` (a new record
    timestamp), a copy published late an earlier one. The times are read in spans
    (``spans_of_times``), so one late event among fresh ones does not widen the range read
    to the days in between.
    """
    evs = [e for e in _events(events) if e.call_id in existing_calls]
    if not evs:
        return events, 0
    started = time.monotonic()
    times = [e.created_at for e in evs]
    first, last = min(times), max(times)
    stored: dict[UUID, list[datetime]] = {}
    # The common case is one range: no sorting, no filtering of the ids.
    one = last - first <= 2 * window
    spans = [(first, last)] if one else spans_of_times(times, window)
    for low, high in spans:
        ids = [e.id for e in evs] if one else [e.id for e in evs if low <= e.created_at <= high]
        for row in await look_back.fetch(conn, ids, low - window, high + window):
            stored.setdefault(row[0], []).append(row[1])
    # Its time is the window's cost to the write (the bench's --dedup-pairs reads it), and
    # what grows first when a plan goes wrong.
    metrics.DEDUP_LOOK_BACK_SECONDS.observe(time.monotonic() - started)
    metrics.DEDUP_LOOK_BACK_EVENTS.inc(len(evs))
    if not stored:
        return events, 0
    kept = [item for item in events if not _stored_near(_event(item), stored, window)]
    return kept, len(events) - len(kept)


def _stored_near(e: CallEvent, stored: dict[UUID, list[datetime]], window: timedelta) -> bool:
    """Whether ``e``'s id is among ``stored`` with a time within ``window`` of its own."""
    return any(abs(e.created_at - t) <= window for t in stored.get(e.id, ()))


def spans_of_times(times: list[datetime], window: timedelta) -> list[tuple[datetime, datetime]]:
    """The (first, last) of each run of ``times`` (sorted) whose neighbours lie at most two
    windows apart: their look-back ranges overlap, so the runs' ranges, each widened by the
    window, cover exactly the union of the times' own and no day in between."""
    ordered = sorted(times)
    spans: list[tuple[datetime, datetime]] = []
    for t in ordered:
        if spans and t - spans[-1][1] <= 2 * window:
            spans[-1] = (spans[-1][0], t)
        else:
            spans.append((t, t))
    return spans


@dataclass(slots=True)
class _NewCall:
    """A call begun in this batch, with what later events of the batch did to it."""

    event: CallEvent
    status: str = "initiated"
    ended_at: datetime | None = None
    duration: timedelta | None = None
    recording_url: str | None = None
    transcript: str | None = None
    sentiment_score: float | None = None
    cost_cents: int | None = None


@dataclass(slots=True)
class CallPlan:
    """What a batch does to ``calls``, worked out in memory (pure)."""

    new_calls: dict[UUID, _NewCall] = field(default_factory=dict)
    answered: list[UUID] = field(default_factory=list)
    terminations: list[CallEvent] = field(default_factory=list)
    agents_used: dict[UUID, datetime] = field(default_factory=dict)
    terminated_new: int = 0

    @classmethod
    def of(cls, events: list[CallEvent], existing_calls: set[UUID]) -> CallPlan:
        """Apply the batch's events, in order, to new calls; collect updates for the rest."""
        plan = cls()
        answered: set[UUID] = set()
        terminating: set[UUID] = set()
        for e in events:
            if e.initiation is not None:
                agent = e.initiation.agent_id
                if agent is not None and (
                    agent not in plan.agents_used or plan.agents_used[agent] < e.created_at
                ):
                    plan.agents_used[agent] = e.created_at
                if e.call_id not in existing_calls and e.call_id not in plan.new_calls:
                    plan.new_calls[e.call_id] = _NewCall(e)
                continue
            new = plan.new_calls.get(e.call_id)
            if e.event_type == "answer":
                if new is None:
                    if e.call_id not in answered:
                        answered.add(e.call_id)
                        plan.answered.append(e.call_id)
                elif new.status == "initiated" and new.ended_at is None:
                    new.status = "in_progress"
            elif e.termination is not None:
                t = e.termination
                if new is None:
                    if e.call_id not in terminating:
                        terminating.add(e.call_id)
                        plan.terminations.append(e)
                elif new.ended_at is None:
                    new.status = t.status
                    new.ended_at = e.created_at
                    new.duration = (
                        timedelta(seconds=t.duration_seconds)
                        if t.duration_seconds is not None
                        else e.created_at - new.event.created_at
                    )
                    new.recording_url = t.recording_url
                    new.transcript = t.transcript
                    new.sentiment_score = t.sentiment_score
                    new.cost_cents = t.cost_cents
                    plan.terminated_new += 1
        return plan

    def new_call_rows(self) -> list[tuple[Any, ...]]:
        """Rows for COPY into calls, in ``_CALL_COLUMNS`` order."""
        now = datetime.now(UTC)
        rows = []
        for c in self.new_calls.values():
            e, init = c.event, c.event.initiation
            assert init is not None
            rows.append(
                (
                    e.call_id,
                    init.from_number,
                    init.to_number,
                    init.agent_id,
                    c.status,
                    e.created_at,
                    now,
                    c.ended_at,
                    c.duration,
                    c.recording_url,
                    c.transcript,
                    c.sentiment_score,
                    c.cost_cents,
                )
            )
        return rows


def _repeats_of_rejected(
    attempted: list[Item],
    rejected: list[DeadLetter],
    repeats: dict[EventKey, list[Item]],
    result: WriteResult,
) -> list[DeadLetter]:
    """Later copies of an event whose first copy the database rejected follow it to the
    dead-letter topic: no copy of that id is stored, so they are not repeats of one."""
    if not repeats or not rejected:
        return []
    letters = {dl.ref: dl for dl in rejected}
    out: list[DeadLetter] = []
    for item in attempted:
        dl = letters.get(item.ref)
        if dl is None:
            continue
        for repeat in repeats.get(_key(_event(item)), []):
            result.duplicates -= 1
            out.append(
                _dead(repeat, dl.reason, f"repeat of a rejected event: {dl.detail}", dl.sqlstate)
            )
    return out


def _spans(
    items: Sequence[Item],
) -> tuple[dict[TopicPartitionKey, int], dict[TopicPartitionKey, Item]]:
    """Per partition of the batch, in one pass: its lowest offset, and the item with the
    highest (the record just below the partition's new position)."""
    first: dict[TopicPartitionKey, int] = {}
    last: dict[TopicPartitionKey, Item] = {}
    for i in items:
        ref = i.ref
        k = (ref.topic, ref.partition)
        top = last.get(k)
        if top is None:
            first[k] = ref.offset
            last[k] = i
        elif ref.offset > top.ref.offset:
            last[k] = i
        elif ref.offset < first[k]:
            first[k] = ref.offset
    return first, last


def _events(items: Sequence[Item]) -> list[CallEvent]:
    """The events of items that the sink already knows to hold one (not a ``Rejection``):
    unchecked, since it runs over every batch several times."""
    return cast(list[CallEvent], [i.decoded for i in items])


def _event(item: Item) -> CallEvent:
    assert isinstance(item.decoded, CallEvent)
    return item.decoded
