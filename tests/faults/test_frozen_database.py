"""PostgreSQL flows that vanish without a word: a lost NAT or load-balancer entry, a hung
pooler. No RST and no FIN reaches either side, so neither the worker nor the server learns
that the session is gone, and a server session frozen inside a batch transaction keeps its
row locks on the stored positions. Frozen through a proxy at each point of the batch
transaction, and between transactions, with the default session settings: events are
stored again within 20 s, the worker never exits, and the reconciliation is exact."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.faults.harness import assert_reconciled, corpus, publish_slowly
from tests.faults.pgproxy import FREEZE_POINTS, FlowFreezer
from tests.support import WorkerProcess, drained, eventually, stored_positions, worker_env

pytestmark = pytest.mark.faults

# The promise under test: events flow again this soon after the freeze, with the defaults.
RECOVERY_BOUND_S = 20.0
# The test environment's own choices for these are left out: their defaults are under test.
DATABASE_DEFAULTS_UNDER_TEST = (
    "INGEST_WRITE_TIMEOUT_S",
    "INGEST_RETRY_MAX_BACKOFF_S",
    "DATABASE_POOL_MIN",
    "DATABASE_POOL_MAX",
)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", FREEZE_POINTS)
async def test_a_flow_frozen_at_any_point_of_the_batch_holds_the_pipeline_for_seconds_only(
    point: str, database_url, db, topics, tmp_path: Path
):
    records, calls = corpus(200, 0.01, seed=71 + FREEZE_POINTS.index(point))
    async with FlowFreezer(database_url, point) as proxy:
        env = worker_env(proxy.url(), topics)
        for name in DATABASE_DEFAULTS_UNDER_TEST:
            env.pop(name)
        worker = WorkerProcess(env, tmp_path / "w.log").start()
        try:
            producer = asyncio.create_task(publish_slowly(topics, records, chunks=12, pause_s=0.8))

            async def stored_some() -> bool:
                assert worker.alive(), worker.log()[-3000:]
                return sum((await stored_positions(db, topics.group)).values()) > 0

            await eventually(stored_some, 60, "the first stored batch")
            proxy.arm()

            async def frozen() -> bool:
                assert worker.alive(), worker.log()[-3000:]
                return proxy.frozen_at is not None

            await eventually(frozen, 30, f"a flow to reach {point}")
            assert proxy.frozen_at is not None
            # Nothing commits while the flows are frozen: the one writing is among them.
            before = sum((await stored_positions(db, topics.group)).values())

            async def stored_again() -> bool:
                assert worker.alive(), worker.log()[-3000:]
                return sum((await stored_positions(db, topics.group)).values()) > before

            await eventually(stored_again, 4 * RECOVERY_BOUND_S, "events stored again")
            recovered_s = time.monotonic() - proxy.frozen_at
            pub = await producer
            waiting = asyncio.create_task(drained(db, topics, pub, timeout_s=120))
            while not waiting.done():
                assert worker.alive(), worker.log()[-3000:]
                await asyncio.sleep(0.2)
            await waiting
            assert worker.alive(), worker.log()[-3000:]
        finally:
            worker.stop()
    print(
        f"\nfrozen {point} ({proxy.frozen_flows} flows): events stored again after "
        f"{recovered_s:.1f} s"
    )
    assert recovered_s <= RECOVERY_BOUND_S, worker.log()[-3000:]
    assert "Traceback" not in worker.log()
    assert "InterfaceError" not in worker.log()
    await assert_reconciled(db, topics, pub, calls)
