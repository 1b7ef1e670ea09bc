"""A soak: one worker process at a steady offered load for minutes, measured from outside.

Every event's ``created_at`` is the moment it is sent; the bench notes that moment against
the record's partition and offset (from the broker's acknowledgement), and a poll of the
stored positions every ``POLL_S`` notes when each offset became stored. An event's
freshness is the difference: produce to committed, with the broker and the worker's fetch
in it, at most ``POLL_S`` late. A bare consumer in the bench (the probe, no group, the
worker's fetch wait) notes when each offset could first be fetched, which splits an
event's freshness into the broker's share (sent to fetchable) and the worker's (fetchable
to stored). The run is cut into fifths by send time; the first and the last fifth are
compared. Meanwhile the worker's RSS is sampled from ``/proc``, and at each fifth's end
its CPU and its batch-write histogram are read, so a drift can be placed: in the broker,
in the write (the database), or in the worker's CPU.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import statistics
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ingest.tools.bench.corpus import PARTITIONS, Target, clean, create_topic
from ingest.tools.bench.drains import _scrape, _stop, _worker_env, cpu_seconds, sample
from ingest.tools.devbroker import free_port
from ingest.tools.produce import interleave

# How often the stored positions are read: the resolution of every freshness figure.
POLL_S = 0.05
# RSS is sampled this often (shorter runs: 30 samples over the run).
RSS_EVERY_S = 5.0
FIFTHS = 5
# The tables the worker writes, reported at the end (with their TimescaleDB chunks).
_TABLES = ("call_events", "calls", "ingest_consumer_offsets")


@dataclass(slots=True)
class Fifth:
    """One fifth of the run: the events sent in it, and what the worker did meanwhile."""

    events: int
    freshness_p50_s: float
    freshness_p99_s: float
    freshness_max_s: float
    # The two shares of freshness, per event: sent -> fetchable by the probe (the broker),
    # fetchable -> stored (the worker and the database).
    broker_p99_s: float
    worker_p99_s: float
    # From the worker's ingest_batch_write_seconds and ingest_batch_events over the fifth.
    write_mean_ms: float
    batch_mean_events: float
    worker_cpu_us_per_event: float
    # The bench's own process (producer, probe, polls) over the same fifth, and the
    # broker's when the bench started it (else NaN).
    bench_cpu_us_per_event: float
    broker_cpu_us_per_event: float


@dataclass(slots=True)
class TableFigures:
    """One of the worker's tables at the end of the run (chunks added up)."""

    name: str
    live_rows: int
    dead_rows: int
    updates: int
    hot_updates: int
    total_bytes: int
    autovacuums: int
    autoanalyzes: int


@dataclass(slots=True)
class Soak:
    """The worker at a steady offered load for ``seconds``."""

    seconds: float
    offered_eps: float
    rate_eps: float
    events: int
    stored_rows: int
    stored_ids: int
    exact: bool
    rss_every_s: float
    rss_mb: list[float]
    # Warm-up: the first fifth. Growth: the median RSS of the last fifth minus that of the
    # second fifth (the first after warm-up); noise: the spread of the second fifth.
    warmup_s: float
    rss_after_warmup_mb: float
    rss_end_mb: float
    rss_growth_mb: float
    rss_noise_mb: float
    fifths: list[Fifth]
    # Last fifth's freshness p99 over the first's; the same for the worker's share alone.
    p99_ratio: float
    worker_p99_ratio: float
    server_autovacuum: str
    tables: list[TableFigures] = field(default_factory=list)


class _Deliveries:
    """Per partition and offset: when the record was sent, first fetchable, seen stored."""

    def __init__(self) -> None:
        self.sent: dict[int, array[float]] = {p: array("d") for p in range(PARTITIONS)}
        self.fetched: dict[int, array[float]] = {p: array("d") for p in range(PARTITIONS)}
        self.stored: dict[int, array[float]] = {p: array("d") for p in range(PARTITIONS)}

    @staticmethod
    def _put(a: array[float], start: int, stop: int, t: float) -> None:
        if len(a) < stop:
            a.extend([math.nan] * (stop - len(a)))
        for i in range(start, stop):
            a[i] = t

    def was_sent(self, partition: int, offset: int, t: float) -> None:
        self._put(self.sent[partition], offset, offset + 1, t)

    @classmethod
    def _below(cls, a: array[float], below: int, t: float) -> None:
        """Offsets below ``below`` not seen before were seen by ``t``."""
        if below > len(a):
            cls._put(a, len(a), below, t)

    def seen_stored(self, partition: int, below: int, t: float) -> None:
        self._below(self.stored[partition], below, t)

    def seen_fetched(self, partition: int, below: int, t: float) -> None:
        self._below(self.fetched[partition], below, t)

    def caught_up(self, seen: dict[int, array[float]]) -> bool:
        return all(len(seen[p]) >= len(a) for p, a in self.sent.items())

    def by_fifth(self, t0: float, fifth_s: float) -> list[_Shares]:
        """Freshness and its shares of every stored event, by the fifth it was sent in."""
        out = [_Shares() for _ in range(FIFTHS)]
        for p, sent in self.sent.items():
            fetched, stored = self.fetched[p], self.stored[p]
            for i in range(min(len(sent), len(stored))):
                s, d = sent[i], stored[i]
                if math.isnan(s) or math.isnan(d):
                    continue
                shares = out[min(FIFTHS - 1, int((s - t0) / fifth_s))]
                shares.total.append(d - s)
                f = fetched[i] if i < len(fetched) else math.nan
                if not math.isnan(f):
                    shares.broker.append(f - s)
                    shares.worker.append(d - f)
        return out


@dataclass(slots=True)
class _Shares:
    """Per event of one fifth: freshness, and its broker's and worker's shares."""

    total: list[float] = field(default_factory=list)
    broker: list[float] = field(default_factory=list)
    worker: list[float] = field(default_factory=list)


def _quantile(q: float, xs: list[float]) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


@dataclass(slots=True)
class _Mark:
    """The worker's counters and both processes' CPU at one moment."""

    write_s: float
    writes: float
    batch_events: float
    worker_cpu_s: float
    bench_cpu_s: float
    broker_cpu_s: float

    @classmethod
    async def read(cls, port: int, pid: int, broker_pid: int | None) -> _Mark:
        body = await asyncio.to_thread(_scrape, port)
        return cls(
            sample(body, "ingest_batch_write_seconds_sum"),
            sample(body, "ingest_batch_write_seconds_count"),
            sample(body, "ingest_batch_events_sum"),
            cpu_seconds(pid),
            time.process_time(),
            cpu_seconds(broker_pid) if broker_pid is not None else math.nan,
        )


async def soak(
    target: Target,
    bootstrap: str,
    rate: float,
    seconds: float,
    seed: int,
    broker_pid: int | None = None,
) -> Soak:
    """One worker process on a fresh topic, ``rate`` events/s offered for ``seconds``;
    ``broker_pid``: the broker's process, when it runs here (its CPU is reported too)."""
    await clean(target)
    topic = f"bench-soak-{time.time_ns()}"
    await create_topic(bootstrap, topic)
    port = free_port()
    group = f"{topic}-group"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", "run"],
        env=_worker_env(target.url, bootstrap, topic, group, port),
    )
    conn = await asyncpg.connect(target.url)
    try:
        await _until_assigned(port, proc)
        return await _run(
            conn, proc, port, broker_pid, bootstrap, topic, group, rate, seconds, seed
        )
    finally:
        _stop([proc])
        await conn.close()


async def _until_assigned(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 90) -> None:
    """Wait until the worker owns every partition: the group join is not part of the run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("bench: the soak's worker exited before it was assigned")
        try:
            body = await asyncio.to_thread(_scrape, port)
            if sample(body, "ingest_partitions_assigned") >= PARTITIONS:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("bench: the soak's worker was not assigned its partitions")


async def _run(
    conn: asyncpg.Connection,
    proc: subprocess.Popen[bytes],
    port: int,
    broker_pid: int | None,
    bootstrap: str,
    topic: str,
    group: str,
    rate: float,
    seconds: float,
    seed: int,
) -> Soak:
    deliveries = _Deliveries()
    every = min(RSS_EVERY_S, seconds / 30)
    fifth_s = seconds / FIFTHS
    rss: list[float] = []
    marks = [await _Mark.read(port, proc.pid, broker_pid)]
    t0 = time.monotonic()
    done = asyncio.Event()

    async def watch_rss() -> None:
        while not done.is_set():
            rss.append(_rss_mb(proc.pid))
            await asyncio.sleep(t0 + len(rss) * every - time.monotonic())

    async def mark_fifths() -> None:
        for k in range(1, FIFTHS + 1):
            await asyncio.sleep(max(0.0, t0 + k * fifth_s - time.monotonic()))
            marks.append(await _Mark.read(port, proc.pid, broker_pid))

    async def poll_positions() -> None:
        while True:
            rows = await conn.fetch(
                "SELECT partition, next_offset FROM ingest_consumer_offsets "
                "WHERE consumer_group = $1",
                group,
            )
            now = time.monotonic()
            if proc.poll() is not None:
                return  # the run ends with the reason (below)
            for r in rows:
                deliveries.seen_stored(r["partition"], r["next_offset"], now)
            if done.is_set() and deliveries.caught_up(deliveries.stored):
                return
            await asyncio.sleep(POLL_S)

    async def probe() -> None:
        while not (done.is_set() and deliveries.caught_up(deliveries.fetched)):
            got = await consumer.getmany(timeout_ms=200)
            now = time.monotonic()
            for tp, records in got.items():
                if records:
                    deliveries.seen_fetched(tp.partition, records[-1].offset + 1, now)

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=int(os.environ.get("KAFKA_FETCH_MAX_WAIT_MS", "100")),
    )
    await consumer.start()
    consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    steps = (watch_rss, mark_fifths, poll_positions, probe)
    tasks = [asyncio.create_task(f()) for f in steps]
    try:
        sent = await _produce(bootstrap, topic, rate, seconds, seed, t0, deliveries)
        achieved = sent / (time.monotonic() - t0)
        await tasks[1]
        done.set()
        # Generous: the worker catches up on what was still in flight, then the last poll.
        await asyncio.wait_for(asyncio.gather(tasks[2], tasks[3]), timeout=120)
    finally:
        done.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await consumer.stop()
    if proc.poll() is not None:
        raise SystemExit("bench: the soak's worker exited during the run")

    rows, ids = await conn.fetchrow("SELECT count(*), count(DISTINCT id) FROM call_events")
    fresh = deliveries.by_fifth(t0, fifth_s)
    fifths = [_fifth(fresh[k], marks[k], marks[k + 1]) for k in range(FIFTHS)]
    per_fifth = max(1, round(fifth_s / every))
    second = [x for x in rss[per_fifth : 2 * per_fifth] if not math.isnan(x)]
    last = [x for x in rss[-per_fifth:] if not math.isnan(x)]
    after = statistics.median(second) if second else math.nan
    end = statistics.median(last) if last else math.nan
    return Soak(
        seconds=seconds,
        offered_eps=rate,
        rate_eps=achieved,
        events=sent,
        stored_rows=rows,
        stored_ids=ids,
        exact=rows == sent and ids == sent,
        rss_every_s=every,
        rss_mb=[round(x, 1) for x in rss],
        warmup_s=fifth_s,
        rss_after_warmup_mb=after,
        rss_end_mb=end,
        rss_growth_mb=end - after,
        rss_noise_mb=(max(second) - min(second)) if second else math.nan,
        fifths=fifths,
        p99_ratio=_ratio(fifths[-1].freshness_p99_s, fifths[0].freshness_p99_s),
        worker_p99_ratio=_ratio(fifths[-1].worker_p99_s, fifths[0].worker_p99_s),
        server_autovacuum=str(await conn.fetchval("SHOW autovacuum")),
        tables=await _tables(conn),
    )


async def _produce(
    bootstrap: str,
    topic: str,
    rate: float,
    seconds: float,
    seed: int,
    t0: float,
    deliveries: _Deliveries,
) -> int:
    """Send at ``rate`` until ``seconds`` after ``t0``; each record's send time goes to
    ``deliveries`` once the broker has acknowledged it (and so named its offset)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, enable_idempotence=False
    )
    await producer.start()
    sent = 0
    pending: list[tuple[asyncio.Future[Any], float]] = []
    gen = interleave(random.Random(seed), 10**9)

    async def settle() -> None:
        for md, (_, t) in zip(await asyncio.gather(*(f for f, _ in pending)), pending, strict=True):
            deliveries.was_sent(md.partition, md.offset, t)
        pending.clear()

    try:
        while (elapsed := time.monotonic() - t0) < seconds:
            for _ in range(int(elapsed * rate) - sent):
                e = next(gen)
                t = time.monotonic()
                e["created_at"] = datetime.now(UTC).isoformat()
                fut = await producer.send(topic, orjson.dumps(e), key=e["call_id"].encode())
                pending.append((fut, t))
                sent += 1
            if len(pending) > 2000:
                await settle()
            await asyncio.sleep(0.005)
        await settle()
    finally:
        await producer.stop()
    return sent


def _fifth(shares: _Shares, a: _Mark, b: _Mark) -> Fifth:
    writes = max(b.writes - a.writes, 1)
    events = max(b.batch_events - a.batch_events, 1)
    fresh = shares.total
    return Fifth(
        events=len(fresh),
        freshness_p50_s=_quantile(0.5, fresh),
        freshness_p99_s=_quantile(0.99, fresh),
        freshness_max_s=max(fresh, default=math.nan),
        broker_p99_s=_quantile(0.99, shares.broker),
        worker_p99_s=_quantile(0.99, shares.worker),
        write_mean_ms=(b.write_s - a.write_s) / writes * 1000,
        batch_mean_events=(b.batch_events - a.batch_events) / writes,
        worker_cpu_us_per_event=(b.worker_cpu_s - a.worker_cpu_s) / events * 1e6,
        bench_cpu_us_per_event=(b.bench_cpu_s - a.bench_cpu_s) / events * 1e6,
        broker_cpu_us_per_event=(b.broker_cpu_s - a.broker_cpu_s) / events * 1e6,
    )


_TABLE_FIGURES = """
WITH rels AS (
    SELECT t.name, c.oid
    FROM unnest($1::text[]) AS t(name)
    JOIN pg_class c ON c.relname = t.name AND c.relnamespace = current_schema()::regnamespace
), every AS (
    SELECT name, oid FROM rels
    UNION ALL
    SELECT r.name, i.inhrelid FROM rels r JOIN pg_inherits i ON i.inhparent = r.oid
)
SELECT e.name,
       sum(s.n_live_tup)::bigint, sum(s.n_dead_tup)::bigint, sum(s.n_tup_upd)::bigint,
       sum(s.n_tup_hot_upd)::bigint, sum(pg_total_relation_size(e.oid))::bigint,
       sum(s.autovacuum_count)::bigint, sum(s.autoanalyze_count)::bigint
FROM every e JOIN pg_stat_all_tables s ON s.relid = e.oid
GROUP BY e.name ORDER BY e.name
"""


async def _tables(conn: asyncpg.Connection) -> list[TableFigures]:
    """The worker's tables as the statistics collector saw them (chunks added up)."""
    # The collector's view lags a little; this asks for a fresh snapshot of it.
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return [TableFigures(*r) for r in await conn.fetch(_TABLE_FIGURES, list(_TABLES))]
