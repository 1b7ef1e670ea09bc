"""The whole path through a real worker, a real broker and a real PostgreSQL server."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from ingest.pipeline.contract import RecordRef, derive_event_id
from tests.support import (
    Topics,
    call_events,
    drained,
    event,
    eventually,
    http_get,
    http_post,
    publish,
    read_topic,
    reconcile,
    record,
    running_worker,
    worker_env,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def _run(database_url: str, db: asyncpg.Pool, t: Topics, records: list, **env: str):
    pub = await publish(t.bootstrap, t.source, records)
    async with running_worker(worker_env(database_url, t, **env)):
        await drained(db, t, pub)
    return pub


async def test_initiation_creates_a_call_row_with_event_time(database_url, db, topics):
    cid = uuid.uuid4()
    e = event(
        cid, "initiation", {"from_number": "+14155550100", "to_number": "+442071838750"}, at=T0
    )
    await _run(database_url, db, topics, [record(e)])
    row = await db.fetchrow("SELECT * FROM calls WHERE id = $1", cid)
    assert row["status"] == "initiated"
    assert row["from_number"] == "+14155550100"
    assert row["to_number"] == "+442071838750"
    assert row["created_at"] == T0
    assert row["ended_at"] is None
    stored = await db.fetchrow("SELECT * FROM call_events WHERE call_id = $1", cid)
    assert stored["event_type"] == "initiation"
    assert stored["created_at"] == T0
    assert orjson.loads(stored["event_data"])["to_number"] == "+442071838750"


async def test_every_event_type_of_a_call_is_stored_and_the_call_completes(
    database_url, db, topics
):
    cid = uuid.uuid4()
    events = call_events(cid, T0)
    events.insert(4, event(cid, "error", {"code": "asr_timeout"}, at=T0 + timedelta(seconds=7)))
    await _run(database_url, db, topics, [record(e) for e in events])
    types = await db.fetch(
        "SELECT event_type FROM call_events WHERE call_id = $1 ORDER BY created_at", cid
    )
    assert [r["event_type"] for r in types] == [
        "initiation",
        "answer",
        "transcription",
        "response",
        "error",
        "termination",
    ]
    row = await db.fetchrow("SELECT * FROM calls WHERE id = $1", cid)
    assert row["status"] == "completed"
    assert row["ended_at"] == T0 + timedelta(seconds=60)
    assert row["duration"] == timedelta(seconds=60)
    assert row["cost_cents"] == 12


async def test_answer_moves_an_initiated_call_to_in_progress(database_url, db, topics):
    cid = uuid.uuid4()
    events = call_events(cid, T0)[:2]
    await _run(database_url, db, topics, [record(e) for e in events])
    assert await db.fetchval("SELECT status FROM calls WHERE id = $1", cid) == "in_progress"


async def test_termination_sets_every_given_field(database_url, db, topics):
    cid = uuid.uuid4()
    init = call_events(cid, T0)[0]
    term = event(
        cid,
        "termination",
        {
            "status": "failed",
            "duration_seconds": 42.5,
            "recording_url": "s3://rec/1.wav",
            "transcript": "hello world",
            "sentiment_score": -0.25,
            "cost_cents": 2**31 - 1,
        },
        at=T0 + timedelta(minutes=10),
    )
    await _run(database_url, db, topics, [record(init), record(term)])
    row = await db.fetchrow("SELECT * FROM calls WHERE id = $1", cid)
    assert row["status"] == "failed"
    assert row["duration"] == timedelta(seconds=42.5)
    assert row["recording_url"] == "s3://rec/1.wav"
    assert row["transcript"] == "hello world"
    assert row["sentiment_score"] == -0.25
    assert row["cost_cents"] == 2**31 - 1
    assert row["ended_at"] == T0 + timedelta(minutes=10)
    assert row["updated_at"] > row["created_at"]


async def test_a_terminated_call_is_not_reopened_by_later_events(database_url, db, topics):
    cid = uuid.uuid4()
    events = call_events(cid, T0)
    late = [
        event(cid, "answer", {}, at=T0 + timedelta(minutes=5)),
        event(cid, "termination", {"status": "failed"}, at=T0 + timedelta(minutes=6)),
    ]
    pub = await publish(topics.bootstrap, topics.source, [record(e) for e in events])
    async with running_worker(worker_env(database_url, topics)):
        await drained(db, topics, pub)
        pub2 = await publish(topics.bootstrap, topics.source, [record(e) for e in late])
        await drained(db, topics, pub2)
    row = await db.fetchrow("SELECT status, ended_at FROM calls WHERE id = $1", cid)
    assert row["status"] == "completed"
    assert row["ended_at"] == T0 + timedelta(seconds=60)
    assert await db.fetchval("SELECT count(*) FROM call_events WHERE call_id = $1", cid) == 7


async def test_initiation_naming_an_agent_sets_its_last_used_at_never_backwards(
    database_url, db, topics
):
    agent = await db.fetchval(
        "INSERT INTO agents (name, voice_model, context_prompt, last_used_at) "
        "VALUES ('a', 'v1', 'p', $1) RETURNING id",
        T0 + timedelta(hours=1),
    )
    newer, older = uuid.uuid4(), uuid.uuid4()
    init = {"from_number": "+14155550100", "to_number": "+14155550101", "agent_id": str(agent)}
    recs = [
        record(event(older, "initiation", init, at=T0)),
        record(event(newer, "initiation", init, at=T0 + timedelta(hours=2))),
    ]
    await _run(database_url, db, topics, recs)
    assert await db.fetchval("SELECT last_used_at FROM agents WHERE id = $1", agent) == (
        T0 + timedelta(hours=2)
    )
    assert await db.fetchval("SELECT agent_id FROM calls WHERE id = $1", newer) == agent


async def test_unknown_agent_is_dead_lettered_and_the_calls_later_events_are_unknown_call(
    database_url, db, topics
):
    cid = uuid.uuid4()
    events = call_events(cid, T0)
    events[0]["event_data"]["agent_id"] = str(uuid.uuid4())
    await _run(database_url, db, topics, [record(e) for e in events])
    dls = await read_topic(topics.bootstrap, topics.dlq)
    assert [d.reason for d in dls] == ["unknown_agent"] + ["unknown_call"] * 4
    assert await db.fetchval("SELECT count(*) FROM calls WHERE id = $1", cid) == 0


async def test_dead_letters_keep_key_and_value_and_carry_reason_headers(database_url, db, topics):
    cid = uuid.uuid4()
    not_json = record(b"\xff{oops", key=cid)
    bad_type = record(event(cid, "hangup", {}))
    orphan = record(event(uuid.uuid4(), "answer", {}))
    pub = await _run(database_url, db, topics, [not_json, bad_type, orphan])
    dls = {d.reason: d for d in await read_topic(topics.bootstrap, topics.dlq)}
    assert set(dls) == {"invalid_json", "invalid_event", "unknown_call"}
    by_value = {v: (p, o, k) for p, o, (k, v) in pub.records}
    for d in dls.values():
        p, o, k = by_value[d.value]
        assert d.key == k
        assert d.headers["x-ingest-source-topic"] == topics.source
        assert d.source == (p, o)
        assert d.headers["x-ingest-detail"]
    assert "event_type" in dls["invalid_event"].headers["x-ingest-detail"]


async def test_a_value_only_the_database_rejects_is_dead_lettered_alone(database_url, db, topics):
    # A constraint the contract cannot know: only the database refuses the record.
    await db.execute(
        "ALTER TABLE call_events ADD CONSTRAINT test_no_poison "
        "CHECK (NOT (event_data ? 'poison')) NOT VALID"
    )
    try:
        cid = uuid.uuid4()
        events = call_events(cid, T0)
        events[2]["event_data"]["poison"] = True
        await _run(database_url, db, topics, [record(e) for e in events])
    finally:
        await db.execute("ALTER TABLE call_events DROP CONSTRAINT test_no_poison")
    dls = await read_topic(topics.bootstrap, topics.dlq)
    assert [d.reason for d in dls] == ["db_rejected"]
    assert dls[0].headers["x-ingest-sqlstate"] == "23514"
    assert await db.fetchval("SELECT count(*) FROM call_events WHERE call_id = $1", cid) == 4
    assert await db.fetchval("SELECT status FROM calls WHERE id = $1", cid) == "completed"


async def test_a_repeated_event_id_is_stored_once_and_the_first_content_wins(
    database_url, db, topics
):
    cid = uuid.uuid4()
    init = call_events(cid, T0)[0]
    first = event(cid, "transcription", {"text": "first"}, at=T0)
    second = {**first, "event_data": {"text": "second"}}
    pub = await _run(database_url, db, topics, [record(init), record(first), record(second)])
    pub2 = await publish(topics.bootstrap, topics.source, [record(second)])
    async with running_worker(worker_env(database_url, topics)):
        await drained(db, topics, pub2)
    rows = await db.fetch(
        "SELECT event_data FROM call_events WHERE id = $1", uuid.UUID(first["id"])
    )
    assert [orjson.loads(r["event_data"]) for r in rows] == [{"text": "first"}]
    pub.extend(pub2)
    rec = await reconcile(db, topics, pub)
    assert rec.problems == []
    assert rec.duplicates == 2


async def test_a_record_without_id_gets_the_id_of_its_coordinates(database_url, db, topics):
    cid = uuid.uuid4()
    init = call_events(cid, T0)[0]
    del init["id"]
    pub = await _run(database_url, db, topics, [record(init)])
    partition, offset, _ = pub.records[0]
    expected = derive_event_id(RecordRef(topics.source, partition, offset))
    assert await db.fetchval("SELECT call_id FROM call_events WHERE id = $1", expected) == cid


async def test_a_record_without_created_at_takes_the_record_timestamp(database_url, db, topics):
    cid = uuid.uuid4()
    init = call_events(cid, T0)[0]
    del init["created_at"]
    before = datetime.now(UTC) - timedelta(seconds=1)
    await _run(database_url, db, topics, [record(init)])
    at = await db.fetchval("SELECT created_at FROM call_events WHERE call_id = $1", cid)
    assert before <= at <= datetime.now(UTC)


async def test_nul_in_a_string_is_dead_lettered_not_sent_to_copy(database_url, db, topics):
    cid = uuid.uuid4()
    events = call_events(cid, T0)[:3]
    events[2]["event_data"]["text"] = "a\x00b"
    await _run(database_url, db, topics, [record(e) for e in events])
    dls = await read_topic(topics.bootstrap, topics.dlq)
    assert [d.reason for d in dls] == ["invalid_event"]
    assert "NUL" in dls[0].headers["x-ingest-detail"]
    assert await db.fetchval("SELECT count(*) FROM call_events WHERE call_id = $1", cid) == 2


async def test_a_batch_mixing_good_and_bad_records_stores_every_good_one(database_url, db, topics):
    recs = []
    calls = [uuid.uuid4() for _ in range(20)]
    for i, cid in enumerate(calls):
        recs += [record(e) for e in call_events(cid, T0)]
        if i % 3 == 0:
            recs.append(record(b"garbage", key=cid))
            recs.append(record(event(cid, "answer", {}, at="not-a-time")))
    pub = await _run(
        database_url,
        db,
        topics,
        recs,
        INGEST_BATCH_MAX_EVENTS="5000",
        INGEST_BATCH_MAX_WAIT_MS="500",
    )
    rec = await reconcile(db, topics, pub)
    assert rec.problems == []
    assert rec.stored == 100
    assert rec.dead_lettered == 14
    done = await db.fetchval(
        "SELECT count(*) FROM calls WHERE id = ANY($1::uuid[]) AND status = 'completed'", calls
    )
    assert done == 20


async def test_offsets_are_committed_to_kafka_after_the_rows_are_stored(database_url, db, topics):
    cid = uuid.uuid4()
    pub = await _run(database_url, db, topics, [record(e) for e in call_events(cid, T0)])
    consumer = AIOKafkaConsumer(
        bootstrap_servers=topics.bootstrap, group_id=topics.group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        for partition, end in pub.ends.items():
            assert await consumer.committed(TopicPartition(topics.source, partition)) == end
    finally:
        await consumer.stop()


async def test_a_restarted_worker_resumes_where_the_database_says(database_url, db, topics):
    first = [record(e) for e in call_events(uuid.uuid4(), T0)]
    second = [record(e) for e in call_events(uuid.uuid4(), T0)]
    pub = await _run(database_url, db, topics, first)
    pub.extend(await _run(database_url, db, topics, second))
    rec = await reconcile(db, topics, pub)
    assert rec.problems == []
    assert rec.stored == 10


async def test_probes_report_live_ready_and_metrics(database_url, db, topics):
    pub = await publish(
        topics.bootstrap, topics.source, [record(e) for e in call_events(uuid.uuid4(), T0)]
    )
    async with running_worker(worker_env(database_url, topics)) as worker:
        await drained(db, topics, pub)
        port = worker.probes.port
        assert (await http_get(port, "/healthz"))[0] == 200
        assert await http_get(port, "/readyz") == (200, "ready\n")
        status, body = await http_get(port, "/metrics")
        assert status == 200
        for name in (
            "ingest_events_consumed_total",
            "ingest_events_written_total",
            "ingest_events_duplicate_total",
            "ingest_consumer_lag_records",
        ):
            assert name in body
        assert (await http_get(port, "/nope"))[0] == 404


async def test_a_missing_dead_letter_topic_keeps_the_worker_unready(database_url, db, kafka):
    t = Topics.fresh(kafka)
    from tests.support import create_topics

    await create_topics(kafka, {t.source: 1})
    async with running_worker(worker_env(database_url, t)) as worker:
        await eventually(lambda: _probe_ready(worker, 503), 10, "an unready answer")
        await _sleep(1.5)
        assert (await http_get(worker.probes.port, "/readyz"))[0] == 503
        await create_topics(kafka, {t.dlq: 1})
        await eventually(lambda: _probe_ready(worker, 200), 30, "readiness once the topic exists")


async def test_the_dead_letter_topic_is_created_when_allowed(database_url, db, kafka):
    t = Topics.fresh(kafka)
    from tests.support import create_topics

    await create_topics(kafka, {t.source: 2})
    pub = await publish(kafka, t.source, [record(b"junk", key="k")])
    async with running_worker(worker_env(database_url, t, KAFKA_DLQ_CREATE="true")):
        await drained(db, t, pub)
    assert [d.reason for d in await read_topic(kafka, t.dlq)] == ["invalid_json"]


async def _probe_ready(worker, want: int) -> bool:
    try:
        port = worker.probes.port
    except (AssertionError, IndexError):
        return False
    return (await http_get(port, "/readyz"))[0] == want


async def _sleep(s: float) -> None:
    import asyncio

    await asyncio.sleep(s)


async def test_a_repeat_whose_first_copy_was_dead_lettered_is_stored(database_url, db, topics):
    cid = uuid.uuid4()
    init, answer = call_events(cid, T0)[:2]
    # The first copy arrives before its call exists (unknown_call); the retry comes after.
    pub = await _run(database_url, db, topics, [record(answer), record(init), record(answer)])
    assert [d.reason for d in await read_topic(topics.bootstrap, topics.dlq)] == ["unknown_call"]
    assert (
        await db.fetchval("SELECT count(*) FROM call_events WHERE id = $1", uuid.UUID(answer["id"]))
        == 1
    )
    rec = await reconcile(db, topics, pub)
    assert rec.problems == []


async def test_a_breaker_reset_over_http_says_whether_it_was_open(database_url, db, topics):
    async with running_worker(worker_env(database_url, topics)) as worker:
        await eventually(lambda: _probe_ready(worker, 200), 30, "readiness")
        status, body = await http_post(worker.probes.port, "/breaker/reset")
        assert (status, body) == (200, "breaker was not open\n")
