"""Real faults against real processes: kill -9, SIGTERM mid-write, PostgreSQL restarted.

Each test publishes a known corpus, injects the fault, lets the worker drain, and runs the
shared reconciliation: every record in exactly one place, calls rows agreeing with events.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    assert_reconciled,
    corpus,
    pg_ctl,
    publish_slowly,
    until_waiting_on_lock,
)
from tests.support import (
    WorkerProcess,
    drained,
    publish,
    stored_positions,
    worker_env,
)

pytestmark = pytest.mark.faults


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
            await until_waiting_on_lock(db, "ingest_consumer_offsets")
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


async def test_postgresql_restarted_under_the_worker_loses_nothing(
    database_url, db, topics, tmp_path: Path
):
    restart = pg_ctl("restart")
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
