"""``ingest bench --rolling``: a rolling restart under steady load, measured from outside.

Replicas of one group run as processes at a steady offered load. After a warm-up they are
replaced one at a time as a StatefulSet does: SIGTERM, wait for the exit, start the
replacement under the same ``KAFKA_GROUP_INSTANCE_ID`` (the pod name), wait until it is
ready (``/readyz``), then the next one. Nothing is read from the workers themselves:

- each event's produce time is taken when it is sent, its (partition, offset) from the
  broker's acknowledgement; the stored positions are polled every ``POLL_S``, and an
  event counts as stored at the first poll that finds its partition's position past its
  offset. Delivery latency is the difference (resolution: one poll);
- at every poll, how far the newest stored event lies behind the newest event sent (the
  group-wide stop shows here: with every partition revoked nothing new is stored);
- the longest time in which no partition's position advanced;
- the revocations the replicas logged (each is a rebalance that took partitions away);
- afterwards, that every event sent is stored exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from ingest.tools.bench.corpus import Target, clean, create_topic
from ingest.tools.bench.drains import _worker_env
from ingest.tools.devbroker import free_port
from ingest.tools.produce import interleave

POLL_S = 0.1
# Two partitions per replica: a replaced replica's share is a third of the load.
PARTITIONS = 6


@dataclass(slots=True)
class Replica:
    """One worker process of the group (named as its pod would be), and the log file its
    processes write to."""

    name: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return int(self.env["INGEST_HTTP_PORT"])

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "run"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def terminate(self, timeout_s: float = 60) -> tuple[int, float]:
        """SIGTERM and wait for the exit: (exit code, seconds it took)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        return code, time.monotonic() - started

    def revocations(self) -> int:
        """Revocations of at least one partition this replica's processes logged."""
        n = 0
        for line in self.log_path.read_bytes().splitlines():
            if b'"partitions revoked"' in line:
                with contextlib.suppress(orjson.JSONDecodeError):
                    if orjson.loads(line).get("partitions"):
                        n += 1
        return n


@dataclass(slots=True)
class Rolling:
    """What one rolling restart measured."""

    membership: str
    replicas: int
    partitions: int
    offered_eps: float
    session_timeout_ms: str
    heartbeat_interval_ms: str
    roll_s: float = 0.0
    events: int = 0
    events_in_roll: int = 0
    latency_before_p99_s: float = 0.0
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    latency_max_s: float = 0.0
    newest_behind_max_s: float = 0.0
    newest_behind_before_max_s: float = 0.0
    longest_no_advance_s: float = 0.0
    revocations: int = 0
    stop_exit_codes: list[int] = field(default_factory=list)
    stop_s: list[float] = field(default_factory=list)
    replaced_ready_s: list[float] = field(default_factory=list)
    exact: bool = False
    load: str = ""


@dataclass(slots=True)
class _Sent:
    at: float
    partition: int = -1
    offset: int = -1
    stored_at: float | None = None


async def rolling(
    target: Target,
    bootstrap: str,
    rate: float,
    replicas: int = 3,
    static: bool = True,
    warmup_s: float = 15.0,
    settle_s: float = 10.0,
    seed: int = 43,
    say: Any = print,
) -> Rolling:
    """Run replicas at ``rate`` ev/s, roll them one by one, and measure (see the module)."""
    await clean(target)
    topic = f"bench-rolling-{time.time_ns()}"
    await create_topic(bootstrap, topic, partitions=PARTITIONS)
    group = f"{topic}-group"
    logs = Path(tempfile.mkdtemp(prefix="ingest-rolling-"))
    fleet = []
    for i in range(replicas):
        env = _worker_env(target.url, bootstrap, topic, group, free_port())
        env["KAFKA_GROUP_INSTANCE_ID"] = f"ingest-{i}" if static else "off"
        env["LOG_LEVEL"] = "info"
        fleet.append(Replica(f"ingest-{i}", env, logs / f"replica-{i}.log"))
    result = Rolling(
        "static" if static else "dynamic",
        replicas,
        PARTITIONS,
        rate,
        os.environ.get("KAFKA_SESSION_TIMEOUT_MS", "default"),
        os.environ.get("KAFKA_HEARTBEAT_INTERVAL_MS", "default"),
    )
    conn = await asyncpg.connect(target.url)
    try:
        for r in fleet:
            r.start()
        await asyncio.gather(*(_until_ready(r.port) for r in fleet))
        await _run(
            conn, group, topic, bootstrap, rate, fleet, result, warmup_s, settle_s, seed, say
        )
    finally:
        for r in fleet:
            if r.proc is not None and r.proc.poll() is None:
                r.terminate()
        await conn.close()
    result.revocations = sum(r.revocations() for r in fleet)
    say(f"replica logs in {logs}")
    return result


async def _run(
    conn: asyncpg.Connection,
    group: str,
    topic: str,
    bootstrap: str,
    rate: float,
    fleet: list[Replica],
    result: Rolling,
    warmup_s: float,
    settle_s: float,
    seed: int,
    say: Any,
) -> None:
    sent: list[_Sent] = []
    by_partition: dict[int, list[_Sent]] = {}
    producing = asyncio.Event()
    producing.set()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, enable_idempotence=False
    )
    await producer.start()
    samples: list[tuple[float, float]] = []  # (time, newest stored behind newest sent)
    advances: list[float] = []
    pending_acks: set[asyncio.Task[None]] = set()

    async def ack(fut: asyncio.Future[Any], s: _Sent) -> None:
        md = await fut
        s.partition, s.offset = md.partition, md.offset
        by_partition.setdefault(md.partition, []).append(s)

    async def produce() -> None:
        gen = interleave(random.Random(seed), 10**9)
        started = time.monotonic()
        n = 0
        while producing.is_set():
            due = int((time.monotonic() - started) * rate) - n
            for _ in range(due):
                e = next(gen)
                e["created_at"] = datetime.now(UTC).isoformat()
                s = _Sent(time.monotonic())
                fut = await producer.send(topic, orjson.dumps(e), key=e["call_id"].encode())
                sent.append(s)
                task = asyncio.create_task(ack(fut, s))
                pending_acks.add(task)
                task.add_done_callback(pending_acks.discard)
                n += 1
            await asyncio.sleep(0.005)

    async def watch(stop: asyncio.Event) -> None:
        cursor: dict[int, int] = {}  # index into by_partition of the first unstored
        last: dict[int, int] = {}
        while not stop.is_set():
            now = time.monotonic()
            rows = await conn.fetch(
                "SELECT partition, next_offset FROM ingest_consumer_offsets "
                "WHERE consumer_group = $1",
                group,
            )
            positions = {r["partition"]: r["next_offset"] for r in rows}
            if any(positions.get(p, 0) > last.get(p, 0) for p in positions):
                advances.append(now)
            last = positions
            newest_stored = 0.0
            for p, events in by_partition.items():
                # Acknowledgements of one partition arrive in offset order.
                i = cursor.get(p, 0)
                while i < len(events) and events[i].offset < positions.get(p, 0):
                    events[i].stored_at = now
                    i += 1
                cursor[p] = i
                if i:
                    newest_stored = max(newest_stored, events[i - 1].at)
            if sent and newest_stored:
                samples.append((now, max(0.0, sent[-1].at - newest_stored)))
            await asyncio.sleep(max(0.0, POLL_S - (time.monotonic() - now)))

    stop_watch = asyncio.Event()
    producer_task = asyncio.create_task(produce())
    watcher = asyncio.create_task(watch(stop_watch))
    try:
        say(f"warm-up {warmup_s:.0f} s at {rate:,.0f} ev/s")
        await asyncio.sleep(warmup_s)
        roll_start = time.monotonic()
        for r in fleet:
            code, took = await asyncio.to_thread(r.terminate)
            result.stop_exit_codes.append(code)
            result.stop_s.append(round(took, 2))
            started = time.monotonic()
            r.start()
            await _until_ready(r.port)
            result.replaced_ready_s.append(round(time.monotonic() - started, 2))
            ready = result.replaced_ready_s[-1]
            say(f"{r.name}: exit {code} after {took:.1f} s, ready again in {ready:.1f} s")
        roll_end = time.monotonic()
        await asyncio.sleep(settle_s)
        producing.clear()
        await producer_task
        await producer.flush()
        if pending_acks:
            await asyncio.gather(*pending_acks)
        await _until_all_stored(sent, timeout_s=120)
    finally:
        producing.clear()
        stop_watch.set()
        await asyncio.gather(producer_task, watcher, return_exceptions=True)
        await producer.stop()

    result.roll_s = round(roll_end - roll_start, 1)
    result.events = len(sent)
    result.load = _load()
    in_roll = [s for s in sent if roll_start <= s.at <= roll_end]
    before = [s for s in sent if s.at < roll_start and s.at >= roll_start - warmup_s / 2]
    result.events_in_roll = len(in_roll)
    lat = sorted(s.stored_at - s.at for s in in_roll if s.stored_at is not None)
    lat_before = sorted(s.stored_at - s.at for s in before if s.stored_at is not None)
    if lat:
        result.latency_p50_s = round(statistics.median(lat), 2)
        result.latency_p99_s = round(_quantile(lat, 0.99), 2)
        result.latency_max_s = round(lat[-1], 2)
    if lat_before:
        result.latency_before_p99_s = round(_quantile(lat_before, 0.99), 2)
    result.newest_behind_max_s = round(
        max((b for t, b in samples if roll_start <= t <= roll_end), default=0.0), 2
    )
    result.newest_behind_before_max_s = round(
        max((b for t, b in samples if roll_start - warmup_s / 2 <= t < roll_start), default=0.0), 2
    )
    window = [t for t in advances if roll_start <= t <= roll_end]
    edges = [roll_start, *window, roll_end]
    result.longest_no_advance_s = round(max(b - a for a, b in itertools.pairwise(edges)), 2)
    unstored = sum(1 for s in sent if s.stored_at is None)
    total, distinct = await conn.fetchrow("SELECT count(*), count(DISTINCT id) FROM call_events")
    result.exact = unstored == 0 and total == distinct == len(sent)
    if not result.exact:
        say(f"NOT EXACT: {len(sent)} sent, {total} rows, {distinct} ids, {unstored} unseen")


async def _until_all_stored(sent: list[_Sent], timeout_s: float) -> None:
    """Wait until the watcher has seen every sent event stored (or the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(s.stored_at is not None for s in sent):
            return
        await asyncio.sleep(POLL_S)


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


async def _until_ready(port: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(_ready, port):
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"bench: the worker on port {port} did not become ready")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def describe(r: Rolling) -> str:
    """The result as a few lines of text."""
    codes = ", ".join(str(c) for c in r.stop_exit_codes)
    return "\n".join(
        [
            f"rolling restart, {r.membership} membership: {r.replicas} replicas, "
            f"{r.partitions} partitions, {r.offered_eps:,.0f} ev/s offered "
            f"(session timeout {r.session_timeout_ms}, heartbeat {r.heartbeat_interval_ms})",
            f"  roll {r.roll_s:.1f} s; stops exit {codes} in {r.stop_s} s; "
            f"replacements ready after {r.replaced_ready_s} s",
            f"  events sent during the roll: {r.events_in_roll:,}; produce -> stored "
            f"p50 {r.latency_p50_s:.2f} s, p99 {r.latency_p99_s:.2f} s, "
            f"max {r.latency_max_s:.2f} s (before the roll: p99 {r.latency_before_p99_s:.2f} s)",
            f"  newest stored event behind the newest sent: at most {r.newest_behind_max_s:.2f} s "
            f"during the roll ({r.newest_behind_before_max_s:.2f} s before)",
            f"  longest time no partition advanced: {r.longest_no_advance_s:.2f} s; "
            f"revocations logged: {r.revocations}",
            f"  exact (every event stored once): {'yes' if r.exact else 'NO'}; "
            f"{r.events:,} events; load average {r.load}",
        ]
    )
