"""The rest of the fault suite: database outages, a frozen broker,
rebalances, database-only rejections, producer duplicates, a poison flood, a slow
database, and a chaos soak. Every test ends with the shared reconciliation."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import orjson
import pytest

from ingest.tools.devbroker import TansuBroker, free_port
from tests.faults.harness import (
    assert_reconciled,
    corpus,
    pg_ctl,
    publish_slowly,
    until_waiting_on_lock,
)
from tests.support import (
    Published,
    Topics,
    WorkerProcess,
    call_events,
    drained,
    event,
    eventually,
    http_get_blocking,
    publish,
    read_topic,
    record,
    stored_positions,
    worker_env,
)

pytestmark = pytest.mark.faults


def _readyz(port: int) -> int:
    try:
        return http_get_blocking(port, "/readyz")[0]
    except OSError:
        return 0


async def test_postgresql_down_for_30s_makes_the_worker_unready_then_it_recovers(
    database_url, db, topics, tmp_path: Path
):
    stop, start = pg_ctl("stop"), pg_ctl("start")
    if stop is None or start is None:
        pytest.skip("no way to stop and start the PostgreSQL server here")
    records, calls = corpus(200, 0.0, seed=22)
    port = free_port()
    env = worker_env(database_url, topics, INGEST_HTTP_PORT=str(port))
    worker = WorkerProcess(env, tmp_path / "w.log").start()
    try:
        first = await publish(topics.bootstrap, topics.source, records[:500])
        await drained(db, topics, first)
        assert await asyncio.to_thread(_readyz, port) == 200
        await asyncio.to_thread(subprocess.run, stop, check=True, timeout=60)
        down_at = time.monotonic()
        try:
            second = await publish(topics.bootstrap, topics.source, records[500:])
            answers = []
            while time.monotonic() - down_at < 30:
                answers.append(await asyncio.to_thread(_readyz, port))
                await asyncio.sleep(1)
            assert worker.alive(), "the worker must wait for the database, not exit"
        finally:
            await asyncio.to_thread(subprocess.run, start, check=True, timeout=60)
        up_at = time.monotonic()
        await db.expire_connections()
        assert answers[-10:] == [503] * 10
        second.extend(first)
        await drained(db, topics, second, timeout_s=60)
        recovered_s = time.monotonic() - up_at
        await eventually(lambda: _is(port, 200), 20, "readiness after the database is back")
    finally:
        worker.stop()
    assert recovered_s < 30
    await assert_reconciled(db, topics, second, calls)


async def _is(port: int, status: int) -> bool:
    return await asyncio.to_thread(_readyz, port) == status


async def test_a_broker_frozen_for_20s_loses_nothing(
    database_url, db, topics, tansu: TansuBroker | None, tmp_path: Path
):
    if tansu is None or tansu.process is None:
        pytest.skip("needs the suite's own broker process to freeze")
    records, calls = corpus(200, 0.01, seed=23)
    env = worker_env(database_url, topics)
    worker = WorkerProcess(env, tmp_path / "w.log").start()
    try:
        half = len(records) // 2
        pub = await publish(topics.bootstrap, topics.source, records[:half])
        await asyncio.sleep(1.0)
        tansu.process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(20)
        finally:
            tansu.process.send_signal(signal.SIGCONT)
        pub.extend(await publish(topics.bootstrap, topics.source, records[half:]))
        await drained(db, topics, pub, timeout_s=90)
        assert worker.alive()
    finally:
        worker.stop()
    await assert_reconciled(db, topics, pub, calls)


async def test_replicas_joining_and_leaving_mid_stream_lose_and_repeat_nothing(
    database_url, db, topics, tmp_path: Path
):
    records, calls = corpus(500, 0.01, seed=24)
    env = worker_env(database_url, topics, INGEST_BATCH_MAX_EVENTS="100")
    workers = [WorkerProcess(env, tmp_path / "w1.log").start()]
    try:
        producer = asyncio.create_task(publish_slowly(topics, records, chunks=25, pause_s=0.4))
        await asyncio.sleep(2)
        workers.append(WorkerProcess(env, tmp_path / "w2.log").start())
        await asyncio.sleep(2)
        workers.append(WorkerProcess(env, tmp_path / "w3.log").start())
        await asyncio.sleep(3)
        workers[1].kill9()
        await asyncio.sleep(2)
        workers[2].signal(signal.SIGTERM)
        assert await asyncio.to_thread(workers[2].wait, 30) == 0
        pub = await producer
        await drained(db, topics, pub, timeout_s=90)
    finally:
        for w in workers:
            w.stop()
    await assert_reconciled(db, topics, pub, calls)


async def test_a_call_row_deleted_between_validation_and_write_rejects_only_its_event(
    database_url, db, topics, tmp_path: Path
):
    doomed, kept = uuid.uuid4(), uuid.uuid4()
    for cid in (doomed, kept):
        await db.execute(
            "INSERT INTO calls (id, from_number, to_number) VALUES ($1, '+15550001', '+15550002')",
            cid,
        )
    worker = WorkerProcess(worker_env(database_url, topics), tmp_path / "w.log").start()
    try:
        warm = await publish(topics.bootstrap, topics.source, [record(b"{}", key="warm-up")])
        await drained(db, topics, warm)
        async with db.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            # The worker may read calls but its COPY must wait: then the row goes away.
            await conn.execute("LOCK TABLE call_events IN SHARE ROW EXCLUSIVE MODE")
            # One key, so one partition and one write lane: with a lane each, the doomed
            # call's batch could read calls only after the row had gone (unknown_call).
            recs = [record(event(doomed, "answer", {}), key=doomed)] + [
                record(event(kept, "transcription", {"n": i}), key=doomed) for i in range(5)
            ]
            pub = await publish(topics.bootstrap, topics.source, recs)
            await until_waiting_on_lock(db, "call_events")
            await conn.execute("DELETE FROM calls WHERE id = $1", doomed)
            await tx.commit()
        pub.extend(warm)
        await drained(db, topics, pub)
    finally:
        worker.stop()
    dls = await read_topic(topics.bootstrap, topics.dlq)
    assert sorted(d.reason for d in dls) == ["db_rejected", "invalid_event"]
    rejected = next(d for d in dls if d.reason == "db_rejected")
    assert rejected.headers["x-ingest-sqlstate"] == "23503"
    assert orjson.loads(rejected.value or b"{}")["call_id"] == str(doomed)
    assert await db.fetchval("SELECT count(*) FROM call_events WHERE call_id = $1", kept) == 5
    await assert_reconciled(db, topics, pub, [kept])


async def test_producer_duplicates_are_stored_once_with_the_first_content(
    database_url, db, topics, tmp_path: Path
):
    rng = random.Random(25)
    base, calls = corpus(150, 0.0, seed=25)
    records = list(base)
    changed: dict[str, bytes] = {}
    for key, value in rng.sample(base, 150):
        obj = orjson.loads(value)
        if rng.random() < 0.5 and obj["event_type"] not in ("initiation", "termination"):
            obj["event_data"] = {"changed": True}
            changed[obj["id"]] = value
        # A producer's retry re-sends later, sometimes much later, sometimes right after.
        after = records.index((key, value)) + 1
        records.insert(rng.randrange(after, len(records) + 1), (key, orjson.dumps(obj)))
    worker = WorkerProcess(
        worker_env(database_url, topics, INGEST_BATCH_MAX_EVENTS="200"), tmp_path / "w.log"
    ).start()
    try:
        pub = await publish_slowly(topics, records, chunks=6, pause_s=0.5)
        await drained(db, topics, pub)
    finally:
        worker.stop()
    rec = await assert_reconciled(db, topics, pub, calls)
    assert rec.duplicates == 150
    # Where the copy with other content came later, the first content is what is stored.
    rows = await db.fetch(
        "SELECT id::text AS id, event_data FROM call_events WHERE id = ANY($1::uuid[])",
        list(changed),
    )
    first_wins = sum(
        orjson.loads(r["event_data"]) == orjson.loads(changed[r["id"]])["event_data"] for r in rows
    )
    assert first_wins >= 1


async def test_a_poison_flood_trips_the_breaker_and_consumption_resumes_after_reset(
    database_url, db, topics, tmp_path: Path
):
    port = free_port()
    env = worker_env(
        database_url,
        topics,
        INGEST_HTTP_PORT=str(port),
        INGEST_BATCH_MAX_EVENTS="50",
        INGEST_DLQ_BREAKER_WINDOW="200",
        INGEST_DLQ_BREAKER_MIN_RECORDS="100",
        INGEST_DLQ_BREAKER_MAX_RATIO="0.5",
        INGEST_DLQ_BREAKER_COOLDOWN_S="0",
    )
    good = [record(e) for cid in [uuid.uuid4() for _ in range(40)] for e in call_events(cid)]
    poison = [record(b"<html>oops</html>", key=f"k{i}") for i in range(1000)]
    worker = WorkerProcess(env, tmp_path / "w.log").start()
    try:
        pub = await publish(topics.bootstrap, topics.source, good[:100] + poison + good[100:])
        await eventually(lambda: _breaker_open(port), 60, "the breaker to stop consumption")
        stalled = await stored_positions(db, topics.group)
        await asyncio.sleep(2)
        assert await stored_positions(db, topics.group) == stalled, "consumption must stop"
        flooded = len(await read_topic(topics.bootstrap, topics.dlq, settle_s=0.5))
        assert flooded < 400, "the breaker must stop the flood early"
        resets = 0
        deadline = time.monotonic() + 90
        while not await _drained_now(db, topics, pub) and time.monotonic() < deadline:
            if await _breaker_open(port):
                assert await asyncio.to_thread(_post, port, "/breaker/reset") == 200
                resets += 1
            await asyncio.sleep(0.3)
        await drained(db, topics, pub, timeout_s=5)
    finally:
        worker.stop()
    assert resets >= 1
    rec = await assert_reconciled(db, topics, pub, [])
    assert rec.dead_lettered == 1000


async def _breaker_open(port: int) -> bool:
    try:
        status, body = await asyncio.to_thread(http_get_blocking, port, "/readyz")
    except OSError:
        return False
    return status == 503 and "breaker" in body


async def _drained_now(db: asyncpg.Pool, t: Topics, pub: Published) -> bool:
    pos = await stored_positions(db, t.group)
    return all(pos.get(p, 0) >= end for p, end in pub.ends.items())


def _post(port: int, path: str) -> int:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=5) as r:
        return int(r.status)


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


RSS_BOUND_MB = 250


async def test_a_slow_database_keeps_memory_bounded_while_the_backlog_grows(
    database_url, db, topics, tmp_path: Path
):
    records, calls = corpus(6000, 0.0, seed=26)
    env = worker_env(database_url, topics, INGEST_BATCH_MAX_EVENTS="5000")
    worker = WorkerProcess(env, tmp_path / "w.log").start()
    try:
        warm = await publish(topics.bootstrap, topics.source, records[:100])
        await drained(db, topics, warm)
        async with db.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("LOCK TABLE call_events IN SHARE ROW EXCLUSIVE MODE")
            pub = await publish(topics.bootstrap, topics.source, records[100:])
            await asyncio.sleep(8)  # the backlog waits behind the lock
            blocked_peak = _peak_rss_mb(worker.pid)
            await tx.rollback()
        pub.extend(warm)
        await drained(db, topics, pub, timeout_s=120)
        peak = _peak_rss_mb(worker.pid)
    finally:
        worker.stop()
    print(f"records={len(records)} peak RSS blocked={blocked_peak:.0f} MB overall={peak:.0f} MB")
    assert peak < RSS_BOUND_MB
    await assert_reconciled(db, topics, pub, calls)


async def test_chaos_soak_three_replicas_random_kills_exact_reconciliation(
    database_url, db, topics, tmp_path: Path
):
    records, calls = corpus(2500, 0.01, seed=27)
    env = worker_env(database_url, topics, INGEST_BATCH_MAX_EVENTS="200")
    rng = random.Random(28)
    workers = [WorkerProcess(env, tmp_path / f"w{i}.log").start() for i in range(3)]
    kills = 0
    try:
        producer = asyncio.create_task(publish_slowly(topics, records, chunks=45, pause_s=0.6))
        soak_until = time.monotonic() + 30
        while time.monotonic() < soak_until:
            await asyncio.sleep(rng.uniform(2, 5))
            i = rng.randrange(3)
            workers[i].kill9()
            kills += 1
            workers[i] = WorkerProcess(env, tmp_path / f"w{i}.log").start()
        pub = await producer
        await drained(db, topics, pub, timeout_s=120)
    finally:
        for w in workers:
            w.stop()
    print(f"soak: {len(pub.records)} records, {kills} kills")
    assert kills >= 5
    await assert_reconciled(db, topics, pub, calls)
