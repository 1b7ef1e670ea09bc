"""The worker measured as a process: a backlog drained, and a steady offered load."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from ingest.tools.bench.corpus import check_exactly_once, clean, create_topic
from ingest.tools.devbroker import free_port
from ingest.tools.produce import interleave


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
