"""``ingest bench``: how fast the worker drains a backlog, next to the limits of the machine,
measured side by side in one run on the same broker and database server.

1. preload a topic with N realistic events;
2. database ceiling: the same outcome with the minimal database work (rows prepared in
   memory; per batch, in one transaction: COPY the new calls, COPY the events, one
   set-based UPDATE of the terminated calls);
3. read ceiling: a bare aiokafka consumer reading the topic;
4. the worker draining the backlog from a fresh group (first commit to zero lag), with the
   peak RSS of its process; 5. the same with two worker processes;
6. the worker at a fixed offered load, with freshness (commit time minus event time);
7. one table and a JSON file with the machine's description.

After every run that writes, the benchmark checks that each event is stored exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ingest.devbroker import broker_or_env, free_port, fresh_local_database
from ingest.migrate import Migrator, discover
from ingest.produce import interleave

PARTITIONS = 4
BENCH_DB = "ingest_bench"
START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Result:
    """Everything one bench run measured."""

    events: int
    batch: int
    preload_s: float = 0.0
    db_ceiling_eps: float = 0.0
    read_ceiling_eps: float = 0.0
    drain_1_eps: float = 0.0
    drain_1_peak_rss_mb: float = 0.0
    drain_2_eps: float = 0.0
    drain_2_peak_rss_mb: list[float] = field(default_factory=list)
    steady_rate_eps: float = 0.0
    steady_seconds: float = 0.0
    freshness_p50_s: float = 0.0
    freshness_p95_s: float = 0.0
    freshness_p99_s: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)


def events(n: int, seed: int, start: datetime = START) -> Iterator[dict[str, Any]]:
    """The benchmark's N events: realistic interleaved calls, always the same for a seed."""
    return itertools.islice(interleave(random.Random(seed), n, start=start), n)


# ----------------------------------------------------------------------------- setup


async def bench_database(url: str | None) -> str:
    """A fresh, migrated benchmark database (or the given one, migrated)."""
    if url is None:
        url = await fresh_local_database(BENCH_DB)
    conn = await asyncpg.connect(url)
    try:
        await Migrator(conn, discover()).up()
    finally:
        await conn.close()
    return url


async def clean(url: str) -> None:
    """Empty the tables the runs write, so every run stores the same events anew."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE call_events, calls, ingest_consumer_offsets")
        await conn.execute("VACUUM ANALYZE calls")
    finally:
        await conn.close()


async def create_topic(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, num_partitions=PARTITIONS, replication_factor=1),
                NewTopic(f"{name}.dlq", num_partitions=1, replication_factor=1),
            ]
        )
    finally:
        await admin.close()


async def preload(bootstrap: str, topic: str, n: int, seed: int) -> dict[int, int]:
    """Publish the N events; return the end offset per partition."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        max_batch_size=512 * 1024,
        enable_idempotence=False,
    )
    await producer.start()
    ends: dict[int, int] = {}
    try:
        pending: list[asyncio.Future[Any]] = []
        for e in events(n, seed):
            pending.append(await producer.send(topic, orjson.dumps(e), key=e["call_id"].encode()))
            if len(pending) >= 10_000:
                for md in await asyncio.gather(*pending):
                    ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
                pending.clear()
        for md in await asyncio.gather(*pending):
            ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    finally:
        await producer.stop()
    return ends


# ------------------------------------------------------------------------ the ceilings


def prepared_batches(n: int, seed: int, batch: int) -> list[tuple[list[Any], list[Any], list[Any]]]:
    """Rows in memory, per batch: new calls, events, terminations."""
    out = []
    it = events(n, seed)
    while chunk := list(itertools.islice(it, batch)):
        calls, rows, terms = [], [], []
        for e in chunk:
            ts = datetime.fromisoformat(e["created_at"])
            cid = e["call_id"]
            data = e["event_data"]
            if e["event_type"] == "initiation":
                calls.append((cid, data["from_number"], data["to_number"], ts, ts))
            elif e["event_type"] == "termination":
                terms.append((cid, data.get("status", "completed"), ts, data.get("cost_cents")))
            rows.append((e["id"], cid, e["event_type"], orjson.dumps(data).decode(), ts))
        out.append((calls, rows, terms))
    return out


_TERMINATE = """
UPDATE calls AS c SET status = t.status, ended_at = t.ended_at,
    duration = t.ended_at - c.created_at, cost_cents = t.cost_cents, updated_at = now()
FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::int4[])
     AS t(id, status, ended_at, cost_cents)
WHERE c.id = t.id AND c.ended_at IS NULL
"""


async def database_ceiling(url: str, n: int, seed: int, batch: int) -> float:
    """Events/s of the minimal database work for the same outcome."""
    batches = prepared_batches(n, seed, batch)
    await clean(url)
    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        for calls, rows, terms in batches:
            async with conn.transaction():
                if calls:
                    await conn.copy_records_to_table(
                        "calls",
                        records=calls,
                        columns=("id", "from_number", "to_number", "created_at", "updated_at"),
                    )
                await conn.copy_records_to_table(
                    "call_events",
                    records=rows,
                    columns=("id", "call_id", "event_type", "event_data", "created_at"),
                )
                if terms:
                    await conn.execute(_TERMINATE, *map(list, zip(*terms, strict=True)))
        took = time.perf_counter() - started
        await check_exactly_once(conn, n)
    finally:
        await conn.close()
    return n / took


async def read_ceiling(bootstrap: str, topic: str, n: int) -> float:
    """Records/s of a bare consumer reading the whole topic (no decoding)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 << 20,
        fetch_max_bytes=32 << 20,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        got = 0
        started = time.perf_counter()
        while got < n:
            for recs in (await consumer.getmany(timeout_ms=1000, max_records=50_000)).values():
                got += len(recs)
        return got / (time.perf_counter() - started)
    finally:
        await consumer.stop()


async def check_exactly_once(conn: asyncpg.Connection, n: int) -> None:
    """Fail unless every one of the n events is stored exactly once."""
    total, distinct = await conn.fetchrow("SELECT count(*), count(DISTINCT id) FROM call_events")
    if total != n or distinct != n:
        raise SystemExit(
            f"bench: correctness check failed: {total} rows, {distinct} ids, {n} events published"
        )


# ------------------------------------------------------------------------- the worker


def _peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _worker_env(url: str, bootstrap: str, topic: str, group: str, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": url,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPICS": topic,
        "KAFKA_DLQ_TOPIC": f"{topic}.dlq",
        "KAFKA_GROUP_ID": group,
        "INGEST_HTTP_PORT": str(port),
        "LOG_LEVEL": os.environ.get("INGEST_BENCH_LOG_LEVEL", "warning"),
    }


async def _positions(conn: asyncpg.Connection, group: str) -> dict[int, int]:
    rows = await conn.fetch(
        "SELECT partition, next_offset FROM ingest_consumer_offsets WHERE consumer_group = $1",
        group,
    )
    return {r["partition"]: r["next_offset"] for r in rows}


async def drain(
    url: str, bootstrap: str, topic: str, n: int, ends: dict[int, int], processes: int
) -> tuple[float, list[float]]:
    """Events/s of ``processes`` workers from their first commit to zero lag; peak RSS each."""
    await clean(url)
    group = f"bench-drain-{processes}-{time.time_ns()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ingest", "run"],
            env=_worker_env(url, bootstrap, topic, group, free_port()),
        )
        for _ in range(processes)
    ]
    conn = await asyncpg.connect(url)
    try:
        first_at = first_stored = None
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            pos = await _positions(conn, group)
            stored = sum(pos.values())
            now = time.monotonic()
            if first_at is None and stored > 0:
                first_at, first_stored = now, stored
            if all(pos.get(p, 0) >= e for p, e in ends.items()):
                break
            if any(p.poll() is not None for p in procs):
                raise SystemExit("bench: a worker exited during the drain")
            await asyncio.sleep(0.05)
        else:
            raise SystemExit("bench: the drain did not finish in 30 minutes")
        end_at = time.monotonic()
        rss = [_peak_rss_mb(p.pid) for p in procs]
        await check_exactly_once(conn, n)
    finally:
        await conn.close()
        _stop(procs)
    assert first_at is not None
    assert first_stored is not None
    return (sum(ends.values()) - first_stored) / max(end_at - first_at, 1e-9), rss


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(40)
        except subprocess.TimeoutExpired:
            p.kill()


def _histogram(body: str, name: str) -> list[tuple[float, float]]:
    buckets = []
    for line in body.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append(
                (float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1]))
            )
    return sorted(buckets)


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket."""
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return float("nan")
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_le, prev_count = le, count
    return prev_le


async def steady(
    url: str, bootstrap: str, rate: float, seconds: float, seed: int
) -> tuple[float, float, float, float]:
    """Offered load at ``rate`` for ``seconds``: achieved rate and freshness p50/p95/p99."""
    await clean(url)
    topic = f"bench-steady-{time.time_ns()}"
    await create_topic(bootstrap, topic)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", "run"],
        env=_worker_env(url, bootstrap, topic, f"{topic}-group", port),
    )
    try:
        await _until_ready(port)
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", linger_ms=5, enable_idempotence=False
        )
        await producer.start()
        sent = 0
        started = time.monotonic()
        pending: list[asyncio.Future[Any]] = []
        # Event times are "now" as each event is sent, so freshness is the pipeline's delay.
        gen = interleave(random.Random(seed), 10**9)
        try:
            while (elapsed := time.monotonic() - started) < seconds:
                due = int(elapsed * rate) - sent
                for _ in range(due):
                    e = next(gen)
                    e["created_at"] = datetime.now(UTC).isoformat()
                    pending.append(
                        await producer.send(topic, orjson.dumps(e), key=e["call_id"].encode())
                    )
                    sent += 1
                if len(pending) > 2000:
                    await asyncio.gather(*pending)
                    pending.clear()
                await asyncio.sleep(0.005)
            await asyncio.gather(*pending)
        finally:
            await producer.stop()
        achieved = sent / (time.monotonic() - started)
        await asyncio.sleep(3)
        body = await asyncio.to_thread(_scrape, port)
        buckets = _histogram(body, "ingest_event_freshness_seconds")
    finally:
        _stop([proc])
    return achieved, quantile(0.5, buckets), quantile(0.95, buckets), quantile(0.99, buckets)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


async def _until_ready(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("bench: the worker did not become ready")


# ----------------------------------------------------------------------------- report


async def machine(url: str, broker: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kb = 0
    conn = await asyncpg.connect(url)
    try:
        pg = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": pg,
        "broker": broker,
        "date": datetime.now(UTC).isoformat(),
    }


def table(r: Result) -> str:
    """The human-readable result."""
    rows = [
        ("events", f"{r.events:,}", ""),
        ("batch size", f"{r.batch:,}", ""),
        (
            "database ceiling",
            f"{r.db_ceiling_eps:,.0f} ev/s",
            "COPY calls + COPY events + 1 UPDATE per batch",
        ),
        ("read ceiling", f"{r.read_ceiling_eps:,.0f} rec/s", "bare aiokafka consumer"),
        (
            "worker, 1 process",
            f"{r.drain_1_eps:,.0f} ev/s",
            f"{r.drain_1_eps / r.db_ceiling_eps:.2f} x db ceiling, "
            f"{r.drain_1_eps / r.read_ceiling_eps:.2f} x read ceiling",
        ),
        ("  peak RSS", f"{r.drain_1_peak_rss_mb:.0f} MB", ""),
        (
            "worker, 2 processes",
            f"{r.drain_2_eps:,.0f} ev/s",
            f"{r.drain_2_eps / r.db_ceiling_eps:.2f} x db ceiling",
        ),
        ("  peak RSS", " / ".join(f"{x:.0f}" for x in r.drain_2_peak_rss_mb) + " MB", ""),
        ("steady load", f"{r.steady_rate_eps:,.0f} ev/s for {r.steady_seconds:.0f} s", ""),
        (
            "  freshness p50/p95/p99",
            f"{r.freshness_p50_s:.3f} / {r.freshness_p95_s:.3f} / {r.freshness_p99_s:.3f} s",
            "commit time - event time",
        ),
    ]
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows)


async def run(args: argparse.Namespace, bootstrap: str, broker: str) -> Result:
    """Every measurement in order; prints progress to stderr."""
    url = await bench_database(os.environ.get("BENCH_DATABASE_URL"))
    r = Result(events=args.events, batch=args.batch)
    r.machine = await machine(url, broker)
    topic = f"bench-{time.time_ns()}"
    await create_topic(bootstrap, topic)

    def say(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    say(f"preloading {args.events:,} events")
    t = time.perf_counter()
    ends = await preload(bootstrap, topic, args.events, args.seed)
    r.preload_s = time.perf_counter() - t
    say("database ceiling")
    r.db_ceiling_eps = await database_ceiling(url, args.events, args.seed, args.batch)
    say("read ceiling")
    r.read_ceiling_eps = await read_ceiling(bootstrap, topic, args.events)
    say("worker, one process")
    r.drain_1_eps, rss1 = await drain(url, bootstrap, topic, args.events, ends, 1)
    r.drain_1_peak_rss_mb = rss1[0]
    say("worker, two processes")
    r.drain_2_eps, r.drain_2_peak_rss_mb = await drain(url, bootstrap, topic, args.events, ends, 2)
    if args.steady_seconds > 0:
        say(f"steady load {args.steady_rate:,.0f} ev/s for {args.steady_seconds:.0f} s")
        r.steady_seconds = args.steady_seconds
        (r.steady_rate_eps, r.freshness_p50_s, r.freshness_p95_s, r.freshness_p99_s) = await steady(
            url, bootstrap, args.steady_rate, args.steady_seconds, args.seed + 1
        )
    return r


def main(argv: list[str] | None = None) -> int:
    """``ingest bench``."""
    p = argparse.ArgumentParser(prog="ingest bench", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=5_000, help="the worker's default batch size")
    p.add_argument("--steady-rate", type=float, default=5_000)
    p.add_argument("--steady-seconds", type=float, default=60)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output", type=Path, default=Path("bench-results/latest.json"))
    args = p.parse_args(argv)
    with broker_or_env() as (bootstrap, broker):
        result = asyncio.run(run(args, bootstrap, "tansu (in memory)" if broker else bootstrap))
    print(table(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps(asdict(result), option=orjson.OPT_INDENT_2) + b"\n")
    print(f"written {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
