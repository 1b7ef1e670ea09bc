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
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from ingest.tools.bench.corpus import Target, check_exactly_once, clean, create_topic
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


def _worker_env(
    url: str,
    bootstrap: str,
    topic: str,
    group: str,
    port: int,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    return {
        **os.environ,
        **(extra or {}),
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


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` so far: the time its threads have run, in nanoseconds
    (``/proc/PID/task/*/schedstat``), else user + system time in clock ticks (``/proc/PID/stat``
    fields 14, 15).

    Ticks are 10 ms: a drain of a few thousand events, most of them committed before the
    first poll saw a commit, measured 0 CPU in them. The nanosecond count leaves out threads
    that have ended; the worker's threads live as long as it does."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        if os.path.exists(f"/proc/{pid}/task/{tasks[0]}/schedstat"):
            return sum(_run_ns(pid, task) for task in tasks) / 1e9
    except (OSError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces: count fields after its ')'.
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _run_ns(pid: int, task: str) -> int:
    try:
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # the thread ended between the listing and the read


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class Drain:
    """One backlog drained by ``processes`` workers."""

    processes: int
    eps: float
    events: int
    seconds: float
    cpu_us_per_event: float
    peak_rss_mb: list[float]
    finished: bool = True
    # The Python floor measured around this drain (floor.py: the mean of a run right before
    # it and one right after; 0: not measured), and the CPU per event as a multiple of it.
    floor_us: float = 0.0
    cpu_x_floor: float = 0.0
    # The same-work database ceiling around this drain: the mean of the ceiling run right
    # before it and the one right after (0: not measured).
    ceiling_eps: float = 0.0
    # The workers' time storing batches and, of it, in the dedup window's look-back, summed
    # over the processes (their ``ingest_batch_write_seconds`` and
    # ``ingest_dedup_look_back_seconds``, read as the drain ends; 0: not read).
    write_s: float = 0.0
    look_back_s: float = 0.0


async def drain(
    target: Target,
    bootstrap: str,
    topic: str,
    n: int,
    ends: dict[int, int],
    processes: int,
    timeout_s: float = 1800,
    settings: Mapping[str, str] | None = None,
) -> Drain:
    """``processes`` workers drain the topic from a fresh group: events/s and CPU per event
    from their first commit to zero lag (or to ``timeout_s``: then the row says so), peak
    RSS each. Afterwards every event stored is checked to be stored exactly once. The
    workers take the bench's environment, with ``settings`` on top of it."""
    await clean(target)
    group = f"bench-drain-{processes}-{time.time_ns()}"
    ports = [free_port() for _ in range(processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ingest", "run"],
            env=_worker_env(target.url, bootstrap, topic, group, port, settings),
        )
        for port in ports
    ]
    conn = await asyncpg.connect(target.url)
    try:
        return await _measure_drain(conn, procs, ports, group, n, ends, processes, timeout_s)
    finally:
        await conn.close()


async def _measure_drain(
    conn: asyncpg.Connection,
    procs: list[subprocess.Popen[bytes]],
    ports: list[int],
    group: str,
    n: int,
    ends: dict[int, int],
    processes: int,
    timeout_s: float,
) -> Drain:
    try:
        first_at = first_stored = None
        cpu_first = 0.0
        stored = 0
        finished = False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pos = await _positions(conn, group)
            stored = sum(pos.values())
            now = time.monotonic()
            if first_at is None and stored > 0:
                first_at, first_stored = now, stored
                cpu_first = sum(cpu_seconds(p.pid) for p in procs)
            if all(pos.get(p, 0) >= e for p, e in ends.items()):
                finished = True
                break
            if any(p.poll() is not None for p in procs):
                raise SystemExit("bench: a worker exited during the drain")
            await asyncio.sleep(0.05)
        end_at = time.monotonic()
        cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu_first
        rss = [_peak_rss_mb(p.pid) for p in procs]
        write_s, look_back_s = await _write_times(ports)
    finally:
        _stop(procs)
    # A drain cut short is checked for what its workers committed before they stopped.
    committed = sum((await _positions(conn, group)).values())
    await check_exactly_once(conn, n if finished else committed)
    if first_at is None or first_stored is None:
        return Drain(processes, 0.0, 0, end_at - (deadline - timeout_s), 0.0, rss, finished)
    drained = (sum(ends.values()) if finished else stored) - first_stored
    seconds = max(end_at - first_at, 1e-9)
    return Drain(
        processes,
        drained / seconds,
        drained,
        seconds,
        cpu / max(drained, 1) * 1e6,
        rss,
        finished,
        write_s=write_s,
        look_back_s=look_back_s,
    )


async def _write_times(ports: list[int]) -> tuple[float, float]:
    """The workers' summed time storing batches and in the dedup look-back so far, read from
    their ``/metrics`` (a worker that does not answer counts 0: the row then says less)."""
    write_s = look_back_s = 0.0
    for port in ports:
        try:
            body = await asyncio.to_thread(_scrape, port)
        except OSError:
            continue
        write_s += sample(body, "ingest_batch_write_seconds_sum")
        look_back_s += sample(body, "ingest_dedup_look_back_seconds_sum")
    return write_s, look_back_s


def sample(body: str, name: str) -> float:
    """A sample without labels from a Prometheus text exposition (0 when absent)."""
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


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
    target: Target, bootstrap: str, rate: float, seconds: float, seed: int
) -> tuple[float, float, float, float]:
    """Offered load at ``rate`` for ``seconds``: achieved rate and freshness p50/p95/p99."""
    await clean(target)
    url = target.url
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
