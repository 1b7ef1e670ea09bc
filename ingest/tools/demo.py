"""``make demo``: a throwaway broker (unless KAFKA_BOOTSTRAP_SERVERS is set), the local
PostgreSQL (unless DATABASE_URL is set), migrations, the worker and the producer for about
30 s with a live progress line, then a report from the database and the dead-letter topic."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from ingest.service.settings import redact_url
from ingest.tools.devbroker import broker_or_env, free_port, fresh_local_database
from ingest.tools.migrate import Migrator, discover
from ingest.tools.produce import ProduceStats, produce
from ingest.tools.report import summary

DEMO_DB = "ingest_demo"
TOPIC, DLQ, GROUP = "call-events", "call-events.dlq", "call-events-ingest"
RATE, SECONDS = 1500, 25


async def _database(url: str | None) -> str:
    # A fresh demo database each run, so the report shows this run only.
    return url or await fresh_local_database(DEMO_DB)


async def _prepare(database_url: str, bootstrap: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        done = await Migrator(conn, discover()).up()
        print(f"migrations applied: {len(done)}")
    finally:
        await conn.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for name, parts in ((TOPIC, 4), (DLQ, 1)):
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [NewTopic(name, num_partitions=parts, replication_factor=1)]
                )
    finally:
        await admin.close()


def _metric(body: str, name: str) -> float:
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return ""


async def _progress(port: int, started: float, produced: ProduceStats, stop: asyncio.Event) -> None:
    while not stop.is_set():
        body = await asyncio.to_thread(_scrape, port)
        written = _metric(body, "ingest_events_written_total")
        dead = _metric(body, "ingest_events_dead_lettered_total")
        lag = _metric(body, "ingest_consumer_lag_records")
        print(
            f"\r[{time.monotonic() - started:5.1f}s] produced {produced.events:>7} "
            f"written {written:>7.0f}  dead-lettered {dead:>5.0f}  lag {lag:>6.0f}   ",
            end="",
            flush=True,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1)
    print()


async def _dead_letters(bootstrap: str) -> Counter[str]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    reasons: Counter[str] = Counter()
    try:
        await consumer.topics()
        parts = consumer.partitions_for_topic(DLQ) or {0}
        consumer.assign([TopicPartition(DLQ, p) for p in parts])
        quiet = time.monotonic()
        while time.monotonic() - quiet < 1.5:
            for recs in (await consumer.getmany(timeout_ms=300)).values():
                for r in recs:
                    reasons[dict(r.headers).get("x-ingest-reason", b"?").decode()] += 1
                quiet = time.monotonic()
    finally:
        await consumer.stop()
    return reasons


async def _demo(database_url: str, bootstrap: str) -> int:
    await _prepare(database_url, bootstrap)
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPICS": TOPIC,
        "KAFKA_DLQ_TOPIC": DLQ,
        "KAFKA_GROUP_ID": GROUP,
        "INGEST_HTTP_PORT": str(port),
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "error"),
    }
    worker = subprocess.Popen([sys.executable, "-m", "ingest", "run"], env=env)
    started = time.monotonic()
    produced = ProduceStats()
    stop = asyncio.Event()
    progress = asyncio.create_task(_progress(port, started, produced, stop))
    try:
        calls = RATE * SECONDS // 10  # a synthetic call has about ten events
        stats = await produce(
            bootstrap,
            TOPIC,
            calls,
            rate=RATE,
            invalid_fraction=0.01,
            seed=7,
            progress=False,
            stats=produced,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            body = await asyncio.to_thread(_scrape, port)
            if (
                _metric(body, "ingest_events_consumed_total") >= stats.events
                and _metric(body, "ingest_consumer_lag_records") == 0
            ):
                break
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await progress
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.wait, 40)
    print(f"worker stopped with exit code {code}")
    print(
        f"published {stats.events} events of {stats.calls} calls "
        f"({stats.invalid} deliberately invalid)"
    )
    conn = await asyncpg.connect(database_url)
    try:
        print(await summary(conn))
    finally:
        await conn.close()
    reasons = await _dead_letters(bootstrap)
    print("dead letters by reason:")
    for reason, n in reasons.most_common() or [("(none)", 0)]:
        print(f"  {reason:<20} {n:>10}")
    return code


def main() -> int:
    """Run the demo; return the worker's exit code."""
    url = os.environ.get("DATABASE_URL") or None
    with broker_or_env() as (bootstrap, broker):
        if broker is not None:
            print(f"started a throwaway Tansu broker on {bootstrap}")
        database_url = asyncio.run(_database(url))
        print(f"database: {redact_url(database_url)}")
        return asyncio.run(_demo(database_url, bootstrap))


if __name__ == "__main__":
    raise SystemExit(main())
