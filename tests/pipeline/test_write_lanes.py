"""Two write lanes in one worker (``INGEST_WRITE_LANES``), on a real broker and PostgreSQL:
one lane's transaction does not wait for the other's, and together they stay exact."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime

import asyncpg

from tests.support import (
    Topics,
    call_events,
    call_mismatches,
    consumed,
    drained,
    event,
    eventually,
    one_connection_writer,
    publish,
    reconcile,
    record,
    running_worker,
    stored_positions,
    worker_env,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def test_a_lane_whose_write_waits_on_a_lock_does_not_hold_up_the_other_lane(
    database_url: str, db: asyncpg.Pool, topics: Topics
) -> None:
    calls = [uuid.uuid4() for _ in range(40)]
    pub = await publish(
        topics.bootstrap,
        topics.source,
        [record(e) for c in calls for e in call_events(c, T0)],
    )
    assert len(pub.ends) >= 2, "the records should spread over several partitions"
    blocked = min(pub.ends)
    # An uncommitted row for the blocked partition's stored position: the lane that owns it
    # waits on it (its write locks the positions of its partitions first).
    holder = await asyncpg.connect(database_url)
    tx = holder.transaction()
    await tx.start()
    await holder.execute(
        "INSERT INTO ingest_consumer_offsets (consumer_group, topic, partition, next_offset) "
        "VALUES ($1, $2, $3, 0)",
        topics.group,
        topics.source,
        blocked,
    )
    try:
        env = worker_env(database_url, topics, INGEST_WRITE_LANES="2")
        async with running_worker(env):

            async def others_stored() -> set[int]:
                pos = await stored_positions(db, topics.group)
                return {p for p, end in pub.ends.items() if pos.get(p, 0) >= end}

            deadline = asyncio.get_running_loop().time() + 30
            done: set[int] = set()
            while not done and asyncio.get_running_loop().time() < deadline:
                done = await others_stored()
                await asyncio.sleep(0.1)
            assert done, "no partition was stored while one lane waited on the lock"
            assert blocked not in done
            await tx.rollback()
            await drained(db, topics, pub)
    finally:
        await holder.close()

    rec = await reconcile(db, topics, pub)
    assert rec.problems == []
    assert rec.stored == len(pub.records)
    assert await call_mismatches(db, calls) == []


async def test_a_batch_locks_the_agents_it_touches_in_key_order(
    database_url: str, db: asyncpg.Pool, topics: Topics
) -> None:
    # Two lanes' transactions that lock shared rows in the same order wait for one another;
    # in different orders they can deadlock. Seen from outside: while the higher key is held
    # elsewhere, the batch already holds the lower one.
    low, high = sorted(
        [
            await db.fetchval(
                "INSERT INTO agents (name, voice_model, context_prompt) "
                "VALUES ($1, 'v1', 'p') RETURNING id",
                name,
            )
            for name in ("a", "b")
        ]
    )
    holder = await asyncpg.connect(database_url)
    tx = holder.transaction()
    await tx.start()
    await holder.execute("SELECT 1 FROM agents WHERE id = $1 FOR NO KEY UPDATE", high)
    batch = consumed(
        topics.source,
        0,
        itertools.count(),
        (
            event(
                uuid.uuid4(),
                "initiation",
                {"from_number": "+14155550100", "to_number": "+14155550101", "agent_id": str(a)},
                at=T0,
            )
            for a in (high, low)
        ),
    )
    try:
        async with one_connection_writer(database_url, topics) as writer:
            write = asyncio.create_task(writer.write(batch))
            probe = await asyncpg.connect(database_url)
            try:

                async def low_is_held() -> bool:
                    try:
                        await probe.execute(
                            "SELECT 1 FROM agents WHERE id = $1 FOR NO KEY UPDATE NOWAIT", low
                        )
                    except asyncpg.LockNotAvailableError:
                        return True
                    return False

                await eventually(low_is_held, 5, "the batch to lock the lower agent key")
                assert not write.done()
            finally:
                await probe.close()
                await tx.rollback()
            await asyncio.wait_for(write, 10)
    finally:
        await holder.close()
    assert await db.fetchval("SELECT count(*) FROM agents WHERE last_used_at = $1", T0) == 2
