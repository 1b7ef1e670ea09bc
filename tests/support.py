"""Test helpers that talk to the real broker, database and worker: publish, read the
dead-letter topic, run a worker in-process or as a process, wait for it to drain, and
reconcile what was published with where it ended up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ingest.pipeline.contract import RecordRef, decode
from ingest.pipeline.deadletter import DeadLetterPublisher, header_map
from ingest.pipeline.sink import DEFAULT_DEDUP_WINDOW, BatchWriter, Item
from ingest.pipeline.worker import Worker
from ingest.service.settings import Settings
from ingest.tools.migrate import Migrator, discover


@dataclass(frozen=True)
class Topics:
    """Names for one test: source topic, dead-letter topic, consumer group."""

    bootstrap: str
    source: str
    dlq: str
    group: str

    @classmethod
    def fresh(cls, bootstrap: str) -> Topics:
        tag = uuid.uuid4().hex[:8]
        return cls(bootstrap, f"events-{tag}", f"events-{tag}.dlq", f"ingest-{tag}")


async def create_topics(bootstrap: str, partitions: dict[str, int]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, num_partitions=n, replication_factor=1)
                for name, n in partitions.items()
            ]
        )
    finally:
        await admin.close()


async def migrate(url: str) -> None:
    """Apply every migration to the database at ``url``."""
    conn = await asyncpg.connect(url)
    try:
        await Migrator(conn, discover()).up()
    finally:
        await conn.close()


def worker_env(database_url: str, t: Topics, **extra: str) -> dict[str, str]:
    """Environment for a worker on the test database and topics."""
    env = {
        "DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": t.bootstrap,
        "KAFKA_TOPICS": t.source,
        "KAFKA_DLQ_TOPIC": t.dlq,
        "KAFKA_GROUP_ID": t.group,
        "INGEST_BATCH_MAX_EVENTS": "500",
        "INGEST_BATCH_MAX_WAIT_MS": "50",
        "INGEST_HTTP_PORT": "0",
        "INGEST_RETRY_MAX_BACKOFF_S": "1",
        "INGEST_WRITE_TIMEOUT_S": "10",
        "DATABASE_POOL_MIN": "1",
        "DATABASE_POOL_MAX": "4",
        "LOG_LEVEL": "warning",
        # Tansu answers a join after about two thirds of the session timeout: keep it short
        # (each test that starts a worker waits for one join: test_pipeline.py's 21 tests
        # took 83 s with 3,000 ms, 57 s with 1,500 ms).
        "KAFKA_SESSION_TIMEOUT_MS": "1500",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "500",
    }
    env.update(extra)
    return env


# ---------------------------------------------------------------------------- events


def event(
    call_id: uuid.UUID,
    event_type: str,
    data: dict[str, Any] | None = None,
    *,
    at: datetime | str | None = None,
    event_id: uuid.UUID | None = None,
    **top: Any,
) -> dict[str, Any]:
    """One contract-conforming event as a dict."""
    e: dict[str, Any] = {
        "id": str(event_id or uuid.uuid4()),
        "call_id": str(call_id),
        "event_type": event_type,
        "event_data": data or {},
        "created_at": at if isinstance(at, str) else (at or datetime.now(UTC)).isoformat(),
    }
    e.update(top)
    return e


def call_events(call_id: uuid.UUID, start: datetime | None = None) -> list[dict[str, Any]]:
    """A whole call: initiation, answer, transcription, response, termination."""
    t0 = start or datetime.now(UTC) - timedelta(minutes=5)
    return [
        event(
            call_id,
            "initiation",
            {"from_number": "+14155550100", "to_number": "+14155550199"},
            at=t0,
        ),
        event(call_id, "answer", {}, at=t0 + timedelta(seconds=3)),
        event(call_id, "transcription", {"text": "hello"}, at=t0 + timedelta(seconds=5)),
        event(call_id, "response", {"text": "hi there"}, at=t0 + timedelta(seconds=6)),
        event(
            call_id,
            "termination",
            {"status": "completed", "cost_cents": 12},
            at=t0 + timedelta(seconds=60),
        ),
    ]


def initiation_then_responses(call_id: uuid.UUID, count: int, at: datetime) -> list[dict[str, Any]]:
    """``count`` events of one call, all at ``at``: an initiation, then responses numbered
    from 1."""
    return [
        event(call_id, "initiation", {"from_number": "+15550001", "to_number": "+15550002"}, at=at)
        if n == 0
        else event(call_id, "response", {"n": n}, at=at)
        for n in range(count)
    ]


Record = tuple[bytes | None, bytes | None]


def consumed(
    topic: str, partition: int, offsets: Iterator[int], events: Iterable[dict[str, Any]]
) -> list[Item]:
    """``events`` as the sink gets them: consumed records of ``partition``, each at the next
    of ``offsets``, decoded."""
    out = []
    for e in events:
        ref = RecordRef(topic, partition, next(offsets))
        value = orjson.dumps(e)
        out.append(Item(ref, None, value, decode(value, ref, None)))
    return out


def record(e: dict[str, Any] | bytes, key: str | uuid.UUID | None = None) -> Record:
    """(key, value) for publishing; the key defaults to the event's call_id."""
    if isinstance(e, bytes):
        return ((str(key).encode() if key is not None else None), e)
    k = str(key) if key is not None else e.get("call_id")
    return (k.encode() if isinstance(k, str) else None, orjson.dumps(e))


@dataclass
class Published:
    """What a publish call sent, with coordinates, and the end offset per partition."""

    records: list[tuple[int, int, Record]] = field(default_factory=list)  # partition, offset
    ends: dict[int, int] = field(default_factory=dict)

    def extend(self, other: Published) -> None:
        self.records.extend(other.records)
        for p, o in other.ends.items():
            self.ends[p] = max(self.ends.get(p, 0), o)

    @classmethod
    def acknowledged(cls, records: Sequence[Record], metas: Sequence[Any]) -> Published:
        """The records with the broker's acknowledgements (``RecordMetadata``), in order."""
        out = cls()
        for rec, md in zip(records, metas, strict=True):
            out.records.append((md.partition, md.offset, rec))
            out.ends[md.partition] = max(out.ends.get(md.partition, 0), md.offset + 1)
        return out


async def publish(
    bootstrap: str,
    topic: str,
    records: Sequence[Record],
    partition: int | None = None,
    **producer_options: Any,
) -> Published:
    """Publish in order and wait for every acknowledgement; to ``partition`` when given,
    else where the key leads. ``producer_options`` (a codec, a longer linger) go to the
    producer over the defaults."""
    options: dict[str, Any] = {"acks": "all", "linger_ms": 5, "enable_idempotence": False}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **(options | producer_options))
    await producer.start()
    try:
        futs = [await producer.send(topic, value=v, key=k, partition=partition) for k, v in records]
        metas = await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return Published.acknowledged(records, metas)


@dataclass(frozen=True)
class DeadLetterRecord:
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]

    @property
    def reason(self) -> str:
        return self.headers["x-ingest-reason"]

    @property
    def source(self) -> tuple[int, int]:
        return int(self.headers["x-ingest-source-partition"]), int(
            self.headers["x-ingest-source-offset"]
        )


async def read_topic(bootstrap: str, topic: str, settle_s: float = 1.0) -> list[DeadLetterRecord]:
    """Every record of ``topic`` from the beginning (reads until nothing new for settle_s)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[DeadLetterRecord] = []
    try:
        parts = await _partitions(consumer, topic)
        consumer.assign([TopicPartition(topic, p) for p in parts])
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < settle_s:
            got = await consumer.getmany(timeout_ms=200)
            for recs in got.values():
                for r in recs:
                    out.append(DeadLetterRecord(r.key, r.value, header_map(r.headers)))
                quiet_since = time.monotonic()
    finally:
        await consumer.stop()
    return out


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    for _ in range(50):
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        await consumer.topics()
        await asyncio.sleep(0.1)
    raise AssertionError(f"topic {topic} has no partitions")


# --------------------------------------------------------------------------- waiting


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 60.0, what: str = "condition"
) -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def stored_positions(db: asyncpg.Pool, group: str) -> dict[int, int]:
    rows = await db.fetch(
        "SELECT partition, next_offset FROM ingest_consumer_offsets WHERE consumer_group = $1",
        group,
    )
    return {r["partition"]: r["next_offset"] for r in rows}


async def drained(db: asyncpg.Pool, t: Topics, pub: Published, timeout_s: float = 120.0) -> None:
    """Wait until the stored positions of ``t.group`` reach every published end offset."""

    async def done() -> bool:
        pos = await stored_positions(db, t.group)
        return all(pos.get(p, 0) >= end for p, end in pub.ends.items())

    await eventually(done, timeout_s, f"group {t.group} to store up to {pub.ends}")


# ----------------------------------------------------------------------------- workers


@contextlib.asynccontextmanager
async def one_connection_writer(
    database_url: str,
    topics: Topics,
    *,
    dedup_window: timedelta | None = DEFAULT_DEDUP_WINDOW,
    **pool_options: Any,
) -> AsyncIterator[BatchWriter]:
    """A BatchWriter of the test's group, on a pool of one connection."""
    producer = AIOKafkaProducer(bootstrap_servers=topics.bootstrap, enable_idempotence=False)
    await producer.start()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1, **pool_options)
    try:
        yield BatchWriter(
            pool,
            topics.group,
            DeadLetterPublisher(producer, topics.dlq),
            dedup_window=dedup_window,
        )
    finally:
        await pool.close()
        await producer.stop()


@contextlib.asynccontextmanager
async def running_worker(env: dict[str, str]) -> AsyncIterator[Worker]:
    """A worker in this process's event loop; stopped gracefully on exit."""
    worker = Worker(Settings.from_env(env))
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 40)


class WorkerProcess:
    """``python -m ingest run`` as a real process, for signals and kill -9."""

    def __init__(self, env: dict[str, str], log_path: str | os.PathLike[str]) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        # Logs go to a file: a pipe nobody reads would fill up and block the worker.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "run"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    """Status and body of a request on 127.0.0.1 (async: the server may share this loop)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def http_post(port: int, path: str) -> tuple[int, str]:
    """Status and body of a POST without a body."""
    return await http_get(port, path, method="POST")


def http_get_blocking(port: int, path: str) -> tuple[int, str]:
    """Status and body of a GET, for a server in another process."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ------------------------------------------------------------------------ reconciliation


@dataclass
class Reconciliation:
    stored: int
    dead_lettered: int
    duplicates: int
    problems: list[str]


async def reconcile(db: asyncpg.Pool, t: Topics, pub: Published) -> Reconciliation:
    """Every published record is in exactly one place: a call_events row (its id), the
    dead-letter topic (by source coordinates), or dropped as a repeat of a stored id."""
    dls = await read_topic(t.bootstrap, t.dlq)
    dl_sources = [d.source for d in dls]
    dead = set(dl_sources)
    problems: list[str] = []
    ids: dict[uuid.UUID, list[tuple[int, int]]] = {}
    for partition, offset, (_k, v) in pub.records:
        if (partition, offset) in dead:
            continue
        try:
            obj = orjson.loads(v) if v is not None else None
            eid = uuid.UUID(obj["id"]) if isinstance(obj, dict) and "id" in obj else None
        except (orjson.JSONDecodeError, ValueError, TypeError, KeyError):
            eid = None
        if eid is None:
            from ingest.pipeline.contract import RecordRef, derive_event_id

            eid = derive_event_id(RecordRef(t.source, partition, offset))
        ids.setdefault(eid, []).append((partition, offset))
    rows = await db.fetch(
        "SELECT id, count(*) AS n FROM call_events WHERE id = ANY($1::uuid[]) GROUP BY id",
        list(ids),
    )
    counts = {r["id"]: r["n"] for r in rows}
    duplicates = 0
    for eid, where in ids.items():
        n = counts.get(eid, 0)
        if n == 0:
            problems.append(f"record {where[0]} (id {eid}) is neither stored nor dead-lettered")
        elif n > 1:
            problems.append(f"id {eid} stored {n} times")
        duplicates += len(where) - 1
    published = {(p, o) for p, o, _ in pub.records}
    stray = dead - published
    if stray:
        problems.append(f"dead letters for unpublished coordinates: {sorted(stray)[:5]}")
    return Reconciliation(len(counts), len(dead), duplicates, problems)


async def call_mismatches(db: asyncpg.Pool, call_ids: Sequence[uuid.UUID]) -> list[str]:
    """Calls whose row disagrees with their stored events (status, ended_at)."""
    rows = await db.fetch(
        """
        WITH ev AS (
            SELECT call_id,
                   bool_or(event_type = 'initiation') AS initiated,
                   bool_or(event_type = 'answer') AS answered,
                   min(created_at) FILTER (WHERE event_type = 'termination') AS ended
            FROM call_events WHERE call_id = ANY($1::uuid[]) GROUP BY call_id)
        SELECT ev.*, c.id AS row_id, c.status, c.ended_at
        FROM ev LEFT JOIN calls c ON c.id = ev.call_id
        """,
        list(call_ids),
    )
    problems = []
    for r in rows:
        if r["row_id"] is None:
            problems.append(f"call {r['call_id']} has events but no row")
        elif r["ended"] is not None and r["ended_at"] != r["ended"]:
            problems.append(f"call {r['call_id']} ended_at {r['ended_at']} != {r['ended']}")
        elif r["ended"] is None:
            want = "in_progress" if r["answered"] else "initiated"
            if r["status"] != want or r["ended_at"] is not None:
                problems.append(f"call {r['call_id']} status {r['status']} != {want}")
    return problems
