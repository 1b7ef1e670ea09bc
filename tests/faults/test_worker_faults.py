"""Real faults against real processes: kill -9, SIGTERM mid-write, PostgreSQL restarted.

Each test publishes a known corpus, injects the fault, lets the worker drain, and runs the
shared reconciliation: every record in exactly one place, calls rows agreeing with events.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import orjson
import pytest

from ingest.produce import interleave, invalid_record
from tests.support import (
    Published,
    Record,
    Topics,
    WorkerProcess,
    call_mismatches,
    drained,
    publish,
    reconcile,
    stored_positions,
    worker_env,
)

pytestmark = pytest.mark.faults


def corpus(calls: int, invalid_fraction: float, seed: int) -> tuple[list[Record], list[uuid.UUID]]:
    """Realistic interleaved calls with a share of bad records, and the call ids."""
    rng = random.Random(seed)
    records: list[Record] = []
    ids: set[uuid.UUID] = set()
    for e in interleave(rng, calls):
        ids.add(uuid.UUID(e["call_id"]))
        value = invalid_record(rng, e) if rng.random() < invalid_fraction else orjson.dumps(e)
        records.append((e["call_id"].encode(), value))
    return records, sorted(ids)


async def publish_slowly(
    t: Topics, records: list[Record], chunks: int, pause_s: float
) -> Published:
    pub = Published()
    size = max(1, len(records) // chunks)
    for i in range(0, len(records), size):
        pub.extend(await publish(t.bootstrap, t.source, records[i : i + size]))
        await asyncio.sleep(pause_s)
    return pub


async def assert_reconciled(db: asyncpg.Pool, t: Topics, pub: Published, calls: list[uuid.UUID]):
    rec = await reconcile(db, t, pub)
    assert rec.problems == []
    assert rec.stored + rec.dead_lettered + rec.duplicates == len(pub.records)
    assert await call_mismatches(db, calls) == []
    return rec


async def test_kill_9_at_random_moments_loses_and_repeats_nothing(
    database_url, db, topics, tmp_path: Path
):
    records, calls = corpus(400, 0.02, seed=11)
    env = worker_env(database_url, topics, INGEST_BATCH_MAX_EVENTS="100")
    producer = asyncio.create_task(publish_slowly(topics, records, chunks=20, pause_s=0.3))
    rng = random.Random(5)
    kills = 0
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        while not producer.done() or kills < 3:
            await asyncio.sleep(rng.uniform(1.5, 3.5))
            worker.kill9()
            kills += 1
            worker = WorkerProcess(env, tmp_path / "worker.log").start()
        pub = await producer
        await drained(db, topics, pub, timeout_s=90)
    finally:
        worker.stop()
    rec = await assert_reconciled(db, topics, pub, calls)
    assert kills >= 3
    assert rec.dead_lettered > 0


async def test_sigterm_during_a_write_stores_and_commits_it_then_exits_0(
    database_url, db, topics, tmp_path: Path
):
    records, calls = corpus(60, 0.0, seed=12)
    env = worker_env(database_url, topics, INGEST_SHUTDOWN_TIMEOUT_S="15")
    first = await publish(topics.bootstrap, topics.source, records[:10])
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        await drained(db, topics, first)
        before = sum((await stored_positions(db, topics.group)).values())
        # Hold the positions rows so the next batch's transaction waits mid-write.
        async with db.acquire() as blocker:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute(
                "SELECT * FROM ingest_consumer_offsets WHERE consumer_group = $1 FOR UPDATE",
                topics.group,
            )
            pub = await publish(topics.bootstrap, topics.source, records[10:])
            await _until_waiting_on_lock(db, topics.group)
            worker.signal(signal.SIGTERM)
            await asyncio.sleep(1.0)
            assert worker.alive(), "the worker must finish the write in flight first"
            started = time.monotonic()
            await tx.rollback()
        code = await asyncio.to_thread(worker.wait, 20)
        took = time.monotonic() - started
    finally:
        worker.stop()
    assert code == 0
    assert took < 15
    pub.extend(first)
    # The batch that was waiting when SIGTERM came was stored and its positions advanced.
    assert sum((await stored_positions(db, topics.group)).values()) > before
    # Whatever was fetched before SIGTERM is stored; the rest is read by the next worker.
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        await drained(db, topics, pub)
    finally:
        worker.stop()
    await assert_reconciled(db, topics, pub, calls)


async def _until_waiting_on_lock(db: asyncpg.Pool, group: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%ingest_consumer_offsets%'"
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no write of group {group} waited on the lock")


def _pg_restart_command() -> list[str] | None:
    custom = os.environ.get("TEST_PG_RESTART")
    if custom:
        return custom.split()
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None or os.geteuid() != 0:
        return None
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"]


async def test_postgresql_restarted_under_the_worker_loses_nothing(
    database_url, db, topics, tmp_path: Path
):
    restart = _pg_restart_command()
    if restart is None:
        pytest.skip("no way to restart the PostgreSQL server here (set TEST_PG_RESTART)")
    records, calls = corpus(300, 0.01, seed=13)
    env = worker_env(database_url, topics, INGEST_BATCH_MAX_EVENTS="100")
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        producer = asyncio.create_task(publish_slowly(topics, records, chunks=15, pause_s=0.3))
        await asyncio.sleep(2.5)
        await asyncio.to_thread(subprocess.run, restart, check=True, timeout=60)
        await db.expire_connections()
        pub = await producer
        await drained(db, topics, pub, timeout_s=90)
        assert worker.alive(), "the worker must ride out a restart, not exit"
    finally:
        worker.stop()
    await assert_reconciled(db, topics, pub, calls)
