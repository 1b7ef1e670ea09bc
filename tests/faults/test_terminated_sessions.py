"""Sessions PostgreSQL ends under the worker (failovers, idle-session killers, an operator's
``pg_terminate_backend``, poolers): at every point of the batch transaction, and again and
again without a pause. The worker process never exits and the reconciliation stays exact."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tests.faults.harness import assert_reconciled, corpus, publish_slowly
from tests.faults.pgproxy import POINTS, SessionTerminator
from tests.support import Published, Topics, WorkerProcess, drained, eventually, worker_env

pytestmark = pytest.mark.faults

# How long the soak terminates sessions without a pause; minutes when run by hand.
SOAK_S = float(os.environ.get("INGEST_FAULT_SOAK_S", "10"))


async def drained_by_a_live_worker(db, t: Topics, pub: Published, worker: WorkerProcess) -> None:
    """Wait for the drain; fail at once, with the worker's last words, if it exits."""
    waiting = asyncio.create_task(drained(db, t, pub, timeout_s=120))
    while not waiting.done():
        if not worker.alive():
            waiting.cancel()
            raise AssertionError(f"the worker exited:\n{worker.log()[-3000:]}")
        await asyncio.sleep(0.2)
    await waiting


async def test_a_session_ended_at_any_point_of_the_batch_transaction_never_stops_the_worker(
    database_url, db, topics, tmp_path: Path
):
    records, calls = corpus(400, 0.01, seed=31)
    wanted = dict.fromkeys(POINTS, 1)
    async with SessionTerminator(database_url, wanted) as proxy:
        env = worker_env(proxy.url(), topics, INGEST_BATCH_MAX_EVENTS="20")
        worker = WorkerProcess(env, tmp_path / "w.log").start()
        try:
            pub = await publish_slowly(topics, records, chunks=20, pause_s=0.2)

            async def every_point_hit() -> bool:
                assert worker.alive(), worker.log()[-3000:]
                return proxy.done()

            await eventually(every_point_hit, 90, f"terminations at {wanted}, got {proxy.hits}")
            await drained_by_a_live_worker(db, topics, pub, worker)
        finally:
            worker.stop()
    assert dict(proxy.hits) == wanted
    assert "Traceback" not in worker.log()
    await assert_reconciled(db, topics, pub, calls)


@pytest.mark.timeout(SOAK_S + 180)
async def test_sessions_terminated_again_and_again_without_a_pause_never_stop_the_worker(
    database_url, db, topics, tmp_path: Path
):
    records, calls = corpus(400, 0.01, seed=21)
    env = worker_env(database_url, topics, INGEST_BATCH_MAX_EVENTS="50")
    worker = WorkerProcess(env, tmp_path / "w.log").start()
    killed = 0
    try:
        producer = asyncio.create_task(
            publish_slowly(topics, records, chunks=20, pause_s=SOAK_S / 20)
        )
        ends_at = time.monotonic() + SOAK_S
        while time.monotonic() < ends_at or not producer.done():
            killed += await db.fetchval(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'ingest' AND datname = current_database()) t"
            )
            assert worker.alive(), worker.log()[-3000:]
        pub = await producer
        await drained_by_a_live_worker(db, topics, pub, worker)
    finally:
        worker.stop()
    assert killed > 20
    assert "Traceback" not in worker.log()
    await assert_reconciled(db, topics, pub, calls)
