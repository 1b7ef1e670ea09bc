"""``ingest dlq replay`` against the real broker and worker."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from ingest.service.settings import Settings
from ingest.tools.replay import REPLAY_HEADER, replay
from tests.support import (
    call_events,
    drained,
    publish,
    read_topic,
    record,
    running_worker,
    worker_env,
)

T0 = datetime(2026, 4, 1, tzinfo=UTC)


async def _dead_letter_a_call_with_a_missing_agent(database_url, db, topics):
    agent, cid = uuid.uuid4(), uuid.uuid4()
    events = call_events(cid, T0)
    events[0]["event_data"]["agent_id"] = str(agent)
    recs = [record(e) for e in events] + [record(b"not json", key=cid)]
    pub = await publish(topics.bootstrap, topics.source, recs)
    async with running_worker(worker_env(database_url, topics)):
        await drained(db, topics, pub)
    return agent, cid


async def test_replay_after_the_cause_is_fixed_stores_the_call(database_url, db, topics):
    agent, cid = await _dead_letter_a_call_with_a_missing_agent(database_url, db, topics)
    await db.execute(
        "INSERT INTO agents (id, name, voice_model, context_prompt) VALUES ($1, 'a', 'v', 'p')",
        agent,
    )
    settings = Settings.from_env(worker_env(database_url, topics))
    first = await replay(settings, reason="unknown_agent")
    second = await replay(settings, reason="unknown_call")
    assert first.republished == 1
    assert second.republished == 4
    replayed = [r for r in await read_topic(topics.bootstrap, topics.source) if r.headers]
    assert all(REPLAY_HEADER in r.headers for r in replayed)
    async with running_worker(worker_env(database_url, topics)):
        from tests.support import eventually

        async def stored() -> bool:
            n = await db.fetchval("SELECT count(*) FROM call_events WHERE call_id = $1", cid)
            return n == 5

        await eventually(stored, 30, "the replayed call to be stored")
    assert await db.fetchval("SELECT status FROM calls WHERE id = $1", cid) == "completed"


async def test_replay_resumes_where_it_stopped_and_skips_nothing(database_url, db, topics):
    await _dead_letter_a_call_with_a_missing_agent(database_url, db, topics)
    settings = Settings.from_env(worker_env(database_url, topics))
    assert (await replay(settings, reason="invalid_json")).republished == 1
    everything = await replay(settings)  # a filter keeps its own progress
    assert everything.republished == 6
    again = await replay(settings)
    assert (again.scanned, again.republished) == (0, 0)


async def test_a_dry_run_counts_and_publishes_nothing(database_url, db, topics):
    await _dead_letter_a_call_with_a_missing_agent(database_url, db, topics)
    settings = Settings.from_env(worker_env(database_url, topics))
    before = len(await read_topic(topics.bootstrap, topics.source, settle_s=0.5))
    dry = await replay(settings, dry_run=True)
    assert dry.republished == 0
    assert sum(dry.matched.values()) == 6
    assert dry.matched["unknown_call"] == 4
    assert len(await read_topic(topics.bootstrap, topics.source, settle_s=0.5)) == before
    assert (await replay(settings)).republished == 6  # nothing was committed by the dry run


async def test_since_filters_out_older_dead_letters(database_url, db, topics):
    await _dead_letter_a_call_with_a_missing_agent(database_url, db, topics)
    settings = Settings.from_env(worker_env(database_url, topics))
    later = datetime.now(UTC) + timedelta(hours=1)
    stats = await replay(settings, since=later)
    assert stats.scanned == 6
    assert stats.republished == 0
