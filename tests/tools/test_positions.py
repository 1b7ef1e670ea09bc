"""`ingest positions show | reset` and the recreated-topic check, against a real broker, a
real PostgreSQL server and real workers."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from ingest.tools import positions
from ingest.tools.devbroker import free_port
from tests.support import (
    Topics,
    WorkerProcess,
    call_events,
    create_topics,
    drained,
    event,
    eventually,
    http_get_blocking,
    publish,
    reconcile,
    record,
    running_worker,
    stored_positions,
    worker_env,
)


async def _ingest_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingest",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _calls(n: int) -> list[tuple[bytes | None, bytes | None]]:
    return [record(e) for _ in range(n) for e in call_events(uuid.uuid4())]


async def _store(db: asyncpg.Pool, t: Topics, stored: dict[int, int]) -> None:
    await db.executemany(
        "INSERT INTO ingest_consumer_offsets (consumer_group, topic, partition, next_offset) "
        "VALUES ($1, $2, $3, $4)",
        [(t.group, t.source, p, o) for p, o in stored.items()],
    )


async def _committed(t: Topics, partitions: Sequence[int]) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=t.bootstrap, group_id=t.group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(t.source, p)) for p in partitions}
    finally:
        await consumer.stop()


async def _reset(db: asyncpg.Pool, t: Topics, partitions: list[int] | None, target, **kw):
    async with db.acquire() as conn:
        return await positions.reset(
            conn, t.bootstrap, {}, t.group, t.source, partitions, target, **kw
        )


# -------------------------------------------------------------------------------- show


async def test_show_prints_stored_position_high_watermark_and_lag(database_url, db, topics):
    pub = await publish(topics.bootstrap, topics.source, _calls(12))
    await _store(db, topics, {p: end - 2 for p, end in pub.ends.items()})
    code, out, err = await _ingest_cli(
        worker_env(database_url, topics), "positions", "show", "--topic", topics.source
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"group {topics.group}"
    rows = {int(cols[1]): cols for line in lines[2:] if (cols := line.split())}
    assert set(rows) == {0, 1, 2, 3}
    for p in range(4):
        end = pub.ends.get(p)
        if end is None:
            assert rows[p][2:6] == ["-", "0", "-", "-"]
            continue
        # topic partition stored high_watermark lag kafka_committed check
        assert rows[p][2:7] == [str(end - 2), str(end), "2", "-", "ok"]


# ------------------------------------------------------------------------------- reset


async def test_reset_one_partition_to_earliest_moves_only_that_partition(db, topics):
    pub = await publish(topics.bootstrap, topics.source, _calls(12))
    await _store(db, topics, dict(pub.ends))
    p = next(iter(pub.ends))
    result = await _reset(db, topics, [p], positions.Target("earliest"))
    assert [(m.partition, m.stored, m.to) for m in result.moves] == [(p, pub.ends[p], 0)]
    assert await stored_positions(db, topics.group) == {**pub.ends, p: 0}
    assert await _committed(topics, [p]) == {p: 0}


async def test_reset_one_partition_to_latest_takes_the_fetched_high_watermark(db, topics):
    pub = await publish(topics.bootstrap, topics.source, _calls(12))
    p = next(iter(pub.ends))
    await _store(db, topics, {p: 1})
    await _reset(db, topics, [p], positions.Target("latest"))
    assert await stored_positions(db, topics.group) == {p: pub.ends[p]}
    assert await _committed(topics, [p]) == {p: pub.ends[p]}


async def test_reset_one_partition_to_an_offset(db, topics):
    pub = await publish(topics.bootstrap, topics.source, _calls(12))
    p = next(iter(pub.ends))
    await _store(db, topics, {p: pub.ends[p]})
    await _reset(db, topics, [p], positions.Target("offset", offset=3))
    assert await stored_positions(db, topics.group) == {p: 3}
    assert await _committed(topics, [p]) == {p: 3}


async def test_reset_to_an_offset_outside_the_log_is_refused_and_changes_nothing(db, topics):
    pub = await publish(topics.bootstrap, topics.source, _calls(4))
    p = next(iter(pub.ends))
    await _store(db, topics, {p: 1})
    with pytest.raises(positions.PositionsError, match="outside the log"):
        await _reset(db, topics, [p], positions.Target("offset", offset=pub.ends[p] + 1))
    assert await stored_positions(db, topics.group) == {p: 1}


async def test_reset_one_partition_to_a_time_takes_the_first_record_at_or_after_it(db, topics):
    before = await publish(topics.bootstrap, topics.source, _calls(8))
    await asyncio.sleep(0.05)
    at = datetime.now(UTC)
    await asyncio.sleep(0.05)
    after = await publish(topics.bootstrap, topics.source, _calls(8))
    p = next(p for p in after.ends if p in before.ends)
    first_after = min(o for part, o, _ in after.records if part == p)
    await _reset(db, topics, [p], positions.Target("datetime", at=at))
    assert await stored_positions(db, topics.group) == {p: first_after}


async def test_reset_to_a_time_after_the_last_record_takes_the_high_watermark(db, topics):
    pub = await publish(topics.bootstrap, topics.source, _calls(4))
    p = next(iter(pub.ends))
    await asyncio.sleep(0.05)
    await _reset(db, topics, [p], positions.Target("datetime", at=datetime.now(UTC)))
    assert await stored_positions(db, topics.group) == {p: pub.ends[p]}


async def test_reset_of_a_whole_topic_moves_every_partition_logs_it_and_kafka_follows(
    database_url, db, topics
):
    pub = await publish(topics.bootstrap, topics.source, _calls(12))
    await _store(db, topics, {p: 1 for p in pub.ends})
    env = worker_env(database_url, topics)
    code, out, err = await _ingest_cli(
        env, "positions", "reset", "--topic", topics.source, "--to-latest"
    )
    assert code == 0, err
    ends = {p: pub.ends.get(p, 0) for p in range(4)}
    assert await stored_positions(db, topics.group) == ends
    assert await _committed(topics, range(4)) == ends
    assert "kafka committed offsets: moved" in out
    logged = [orjson.loads(line) for line in err.splitlines() if line.startswith("{")]
    moves = {e["partition"]: e for e in logged if e.get("event") == "positions reset"}
    assert set(moves) == {0, 1, 2, 3}
    for p, e in moves.items():
        assert (e["group"], e["topic"], e["to"], e["target"]) == (
            topics.group,
            topics.source,
            ends[p],
            "latest",
        )
        assert e["from"] == (1 if p in pub.ends else None)
        assert "@" in e["who"]


async def test_a_dry_run_prints_the_plan_and_changes_nothing(database_url, db, topics):
    pub = await publish(topics.bootstrap, topics.source, _calls(12))
    await _store(db, topics, dict(pub.ends))
    code, out, err = await _ingest_cli(
        worker_env(database_url, topics),
        *("positions", "reset", "--topic", topics.source, "--to-earliest", "--dry-run"),
    )
    assert code == 0, err
    for p, end in pub.ends.items():
        assert f"{topics.source}/{p}: would move {end} -> 0" in out
    assert await stored_positions(db, topics.group) == pub.ends
    assert set((await _committed(topics, range(4))).values()) == {None}
    assert "positions reset" not in err


async def test_a_reset_is_refused_while_a_worker_of_the_group_consumes(database_url, db, topics):
    pub = await publish(topics.bootstrap, topics.source, _calls(4))
    env = worker_env(database_url, topics)
    async with running_worker(env):
        await drained(db, topics, pub)
        code, _, err = await _ingest_cli(
            env, "positions", "reset", "--topic", topics.source, "--to-earliest"
        )
        assert code == 1
        assert "live member" in err
        assert "--force" in err
        assert await stored_positions(db, topics.group) == pub.ends


async def test_a_forced_reset_back_under_a_live_worker_makes_it_read_again_from_there(
    database_url, db, topics
):
    pub = await publish(topics.bootstrap, topics.source, _calls(6))
    p = max(pub.ends, key=lambda k: pub.ends[k])
    on_p = [(o, orjson.loads(v)) for part, o, (_, v) in pub.records if part == p and v]
    ids = [uuid.UUID(e["id"]) for _, e in on_p]
    async with running_worker(worker_env(database_url, topics)):
        await drained(db, topics, pub)
        # The operator lost these rows and re-reads the partition to restore them.
        await db.execute("DELETE FROM call_events WHERE id = ANY($1::uuid[])", ids)
        await _reset(db, topics, [p], positions.Target("earliest"), force=True)
        # The live worker learns of the reset with its next batch of that partition.
        call = uuid.UUID(on_p[0][1]["call_id"])
        more = await publish(
            topics.bootstrap, topics.source, [record(event(call, "transcription", {"text": "x"}))]
        )
        pub.extend(more)
        await drained(db, topics, pub, timeout_s=30)

        async def restored() -> bool:
            n = await db.fetchval(
                "SELECT count(*) FROM call_events WHERE id = ANY($1::uuid[])", ids
            )
            return bool(n == len(ids))

        await eventually(restored, 20, "the deleted rows stored again from the reset position")
    rec = await reconcile(db, topics, pub)
    assert rec.problems == []


# ------------------------------------------------------------------- recreated topic


async def _recreate(t: Topics) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=t.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([t.source])
    finally:
        await admin.close()
    for _ in range(50):
        try:
            await create_topics(t.bootstrap, {t.source: 4})
            return
        except Exception:
            await asyncio.sleep(0.2)
    raise AssertionError(f"could not create {t.source} again")


async def test_a_recreated_topic_is_held_until_the_suggested_reset_then_stored_once(
    database_url, db, topics, tmp_path: Path
):
    old = await publish(topics.bootstrap, topics.source, _calls(12))
    port = free_port()
    env = worker_env(database_url, topics, INGEST_HTTP_PORT=str(port))
    worker = WorkerProcess(env, tmp_path / "first.log").start()
    try:
        await drained(db, topics, old)
    finally:
        worker.signal(15)
        await asyncio.to_thread(worker.wait, 30)
    stored_before = await stored_positions(db, topics.group)

    await _recreate(topics)
    # More records than before, so the stored positions are inside the new log: only the
    # fingerprint of the record below them tells the logs apart.
    new = await publish(topics.bootstrap, topics.source, _calls(24))
    while not all(new.ends.get(p, 0) >= end for p, end in stored_before.items()):
        new.extend(await publish(topics.bootstrap, topics.source, _calls(8)))

    worker = WorkerProcess(env, tmp_path / "second.log").start()
    try:

        async def held() -> bool:
            errors = _log_lines(worker, "stored position does not belong to this topic")
            return {e["partition"] for e in errors} == set(stored_before)

        await eventually(held, 30, "an error per partition with a stored position")
        errors = _log_lines(worker, "stored position does not belong to this topic")
        for e in errors:
            assert e["topic"] == topics.source
            assert e["stored_position"] == stored_before[e["partition"]]
            assert e["run"] == (
                f"ingest positions reset --group {topics.group} --topic {topics.source} "
                f"--partition {e['partition']} --to-earliest --force"
            )

        async def unready_with_reason() -> bool:
            status, body = await asyncio.to_thread(http_get_blocking, port, "/readyz")
            return status == 503 and "stored positions do not fit the topic" in body

        await eventually(unready_with_reason, 10, "/readyz 503 naming the held partitions")
        _, metrics = await asyncio.to_thread(http_get_blocking, port, "/metrics")
        assert (
            f'ingest_position_mismatches_total{{topic="{topics.source}"}} '
            f"{float(len(stored_before))}" in metrics
        )
        code, out, _ = await _ingest_cli(env, "positions", "show")
        assert code == 0
        shown = {int(c[1]): line for line in out.splitlines()[2:] if (c := line.split())}
        for p in stored_before:
            assert "mismatch: the record at offset" in shown[p]
        # Nothing was read from the held partitions: their positions did not move.
        now = await stored_positions(db, topics.group)
        assert {p: now[p] for p in stored_before} == stored_before

        results = await asyncio.gather(*(_ingest_cli(env, *e["run"].split()[1:]) for e in errors))
        assert [code for code, _, _ in results] == [0] * len(errors), results
        await drained(db, topics, new, timeout_s=30)
        rec = await reconcile(db, topics, new)
        assert rec.problems == []
        assert rec.stored == len(new.records)

        async def ready() -> bool:
            status, _ = await asyncio.to_thread(http_get_blocking, port, "/readyz")
            return status == 200

        await eventually(ready, 10, "/readyz 200 once the positions fit")
    finally:
        worker.stop()


def _log_lines(worker: WorkerProcess, event: str) -> list[dict]:
    out = []
    for line in worker.log().splitlines():
        if line.startswith("{"):
            entry = orjson.loads(line)
            if str(entry.get("event", "")).startswith(event):
                out.append(entry)
    return out
