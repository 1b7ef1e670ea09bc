"""What the sink does with a repeat of an event key ``(id, created_at)``: the BatchWriter on
a real PostgreSQL server, dead letters on a real broker. The key's own check, so with the
dedup window off (``INGEST_DEDUP_WINDOW=off``); the window is test_dedup_window.py's."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest_asyncio

from ingest.pipeline.sink import BatchWriter, Item, WriteResult
from tests.support import Topics, call_events, consumed, event, one_connection_writer

T0 = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)
_offsets = itertools.count()


@pytest_asyncio.fixture(loop_scope="session")
async def writer(database_url: str, topics: Topics) -> AsyncIterator[BatchWriter]:
    """A BatchWriter of a fresh group, on a pool of one connection, the window off."""
    async with one_connection_writer(database_url, topics, dedup_window=None) as w:
        yield w


def items(topic: str, *events: dict[str, Any]) -> list[Item]:
    """Consumed records of ``events``, at increasing offsets of partition 0."""
    return consumed(topic, 0, _offsets, events)


async def write(writer: BatchWriter, topics: Topics, *events: dict[str, Any]) -> WriteResult:
    return await writer.write(items(topics.source, *events))


async def test_a_repeat_of_a_stored_event_in_a_later_batch_is_a_duplicate(db, writer, topics):
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    await write(writer, topics, init, answer)
    again = {**answer, "event_data": {"other": "content"}}
    result = await write(writer, topics, again)
    assert (len(result.written), result.duplicates, result.dead_letters) == (0, 1, [])
    rows = await db.fetch(
        "SELECT event_data FROM call_events WHERE id = $1", uuid.UUID(answer["id"])
    )
    assert [orjson.loads(r["event_data"]) for r in rows] == [answer["event_data"]]


async def test_a_repeat_of_an_event_stored_months_ago_is_a_duplicate(db, writer, topics):
    old = T0 - timedelta(days=200)
    init, answer = call_events(uuid.uuid4(), old)[:2]
    await write(writer, topics, init, answer)
    result = await write(
        writer,
        topics,
        event(uuid.uuid4(), "initiation", at=T0, from_number="+15550001", to_number="+15550002"),
        answer,
    )
    assert (len(result.written), result.duplicates, result.dead_letters) == (1, 1, [])


async def test_the_same_id_with_another_created_at_is_stored_as_another_event(db, writer, topics):
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    await write(writer, topics, init, answer)
    later = {**answer, "created_at": (T0 + timedelta(hours=1)).isoformat()}
    result = await write(writer, topics, later)
    assert (len(result.written), result.duplicates, result.dead_letters) == (1, 0, [])
    times = await db.fetch(
        "SELECT created_at FROM call_events WHERE id = $1 ORDER BY created_at",
        uuid.UUID(answer["id"]),
    )
    assert [r["created_at"] for r in times] == [
        datetime.fromisoformat(answer["created_at"]),
        T0 + timedelta(hours=1),
    ]


async def test_within_a_batch_repeats_are_matched_by_id_and_created_at(db, writer, topics):
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    same = {**answer, "event_data": {"copy": True}}
    moved = {**answer, "created_at": (T0 + timedelta(hours=2)).isoformat()}
    result = await write(writer, topics, init, answer, same, moved)
    assert (len(result.written), result.duplicates, result.dead_letters) == (3, 1, [])
    n = await db.fetchval("SELECT count(*) FROM call_events WHERE id = $1", uuid.UUID(answer["id"]))
    assert n == 2


async def test_a_stored_key_reused_by_a_call_begun_in_the_batch_does_not_change_that_call(
    db, writer, topics
):
    # A producer bug: an event key already stored for one call comes back naming a call
    # that begins in this batch. It is a repeat of the stored key, so it must neither be
    # stored nor end the new call.
    first = call_events(uuid.uuid4(), T0)
    await write(writer, topics, *first)
    termination = next(e for e in first if e["event_type"] == "termination")
    new_call = uuid.uuid4()
    new_init = call_events(new_call, T0)[0]
    reused = {**termination, "call_id": str(new_call)}
    result = await write(writer, topics, new_init, reused)
    assert (len(result.written), result.duplicates, result.dead_letters) == (1, 1, [])
    assert (result.terminated, result.written[0].id) == (0, uuid.UUID(new_init["id"]))
    row = await db.fetchrow("SELECT status, ended_at FROM calls WHERE id = $1", new_call)
    assert (row["status"], row["ended_at"]) == ("initiated", None)


async def test_a_repeated_termination_does_not_count_a_call_as_terminated_twice(db, writer, topics):
    evs = call_events(uuid.uuid4(), T0)
    first = await write(writer, topics, *evs)
    termination = next(e for e in evs if e["event_type"] == "termination")
    again = await write(writer, topics, termination)
    assert (first.terminated, again.terminated, again.duplicates) == (1, 0, 1)


async def test_plans_are_discarded_once_per_interval_per_session_not_per_batch(
    database_url, topics
):
    discards: list[str] = []

    async def watch(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(
            lambda q: discards.append(q.query) if q.query == "DISCARD PLANS" else None
        )

    async with one_connection_writer(database_url, topics, init=watch) as w:
        for _ in range(10):
            await write(w, topics, *call_events(uuid.uuid4(), T0))
    # Re-planned at the first batch, then after half the session's age (tests/unit/pipeline/
    # test_replan.py): a few times in ten quick batches, never once per batch.
    assert 1 <= len(discards) < 10


class _WatchedConnection(asyncpg.Connection):  # type: ignore[misc]
    """A real connection that notes how each batch stored its events."""

    ways: list[str]
    # The keys each INSERT from the staging table skipped, as it returned them.
    skipped: list[tuple[uuid.UUID, datetime]]

    async def copy_records_to_table(self, table_name: str, **kw: Any) -> str:
        if table_name in ("call_events", "ingest_staged_events"):
            self.ways.append("copy" if table_name == "call_events" else "staged")
        return await super().copy_records_to_table(table_name, **kw)

    async def execute(self, query: str, *args: Any, **kw: Any) -> str:
        if "INSERT INTO call_events" in query:
            self.ways.append("insert")
        return await super().execute(query, *args, **kw)

    async def fetch(self, query: str, *args: Any, **kw: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await super().fetch(query, *args, **kw)
        if "INSERT INTO call_events" in query:
            self.ways.append("insert from staged")
            self.skipped.extend((r[0], r[1]) for r in rows)
        return rows


@pytest_asyncio.fixture(loop_scope="session")
async def watched(
    database_url: str, topics: Topics
) -> AsyncIterator[tuple[BatchWriter, list[str]]]:
    """A BatchWriter whose one connection notes how events were stored."""
    ways: list[str] = []
    _WatchedConnection.ways = ways
    _WatchedConnection.skipped = []
    async with one_connection_writer(
        database_url, topics, dedup_window=None, connection_class=_WatchedConnection
    ) as w:
        yield w, ways


async def test_fresh_events_are_stored_by_copy_alone(watched, topics):
    w, ways = watched
    result = await write(w, topics, *call_events(uuid.uuid4(), T0))
    assert (ways, result.duplicates) == (["copy"], 0)


async def test_a_stored_repeat_fails_the_copy_and_the_staged_insert_drops_it(watched, topics):
    w, ways = watched
    evs = call_events(uuid.uuid4(), T0)
    await write(w, topics, *evs[:2])
    ways.clear()
    result = await write(w, topics, *evs[1:])
    assert (ways, len(result.written), result.duplicates) == (
        ["copy", "staged", "insert from staged"],
        len(evs) - 2,
        1,
    )


async def test_after_stored_repeats_the_next_batches_go_through_the_staging_table(watched, topics):
    w, ways = watched
    evs = call_events(uuid.uuid4(), T0)
    await write(w, topics, evs[0])
    await write(w, topics, *evs[:2])
    ways.clear()
    result = await write(w, topics, *call_events(uuid.uuid4(), T0))
    assert (ways, result.duplicates) == (["staged", "insert from staged"], 0)


async def staged_call(w: BatchWriter, topics: Topics, cid: uuid.UUID) -> list[dict[str, Any]]:
    """A call's events, its first two stored, then a batch of all but the first (one stored
    repeat): that batch went through the staging table, and so will the next ones."""
    evs = call_events(cid, T0)
    await write(w, topics, *evs[:2])
    await write(w, topics, *evs[1:])
    return evs


async def test_events_staged_by_a_committed_batch_do_not_come_back_with_the_next(
    watched, db, topics
):
    w, ways = watched
    cid = uuid.uuid4()
    await staged_call(w, topics, cid)
    # Gone since, as retention or an operator would remove them; the next batch goes through
    # the same session's staging table and must find it empty.
    await db.execute("DELETE FROM call_events WHERE call_id = $1", cid)
    other = call_events(uuid.uuid4(), T0)
    result = await write(w, topics, *other)
    assert ways.count("staged") == 2
    assert (len(result.written), result.duplicates) == (len(other), 0)
    assert await db.fetchval("SELECT count(*) FROM call_events WHERE call_id = $1", cid) == 0


async def test_the_staging_table_holds_no_pages_between_batches(watched, db, topics):
    # Autovacuum skips temporary tables: what a staged batch leaves, the session keeps.
    w, ways = watched
    await staged_call(w, topics, uuid.uuid4())
    sizes = await db.fetch(
        "SELECT pg_relation_size(oid) AS size FROM pg_class"
        " WHERE relname = 'ingest_staged_events' AND relpersistence = 't'"
    )
    assert "staged" in ways
    assert [r["size"] for r in sizes] == [0] * len(sizes)
    assert sizes


async def test_a_staged_batch_with_a_row_the_database_rejects_stores_the_rest_once(
    watched, db, topics
):
    w, ways = watched
    cid = uuid.uuid4()
    evs = call_events(cid, T0)
    await write(w, topics, *evs[:2])
    # A stored repeat: the next batches go through the staging table.
    await write(w, topics, evs[1])
    evs[3] = {**evs[3], "event_data": {**evs[3]["event_data"], "poison": True}}
    await db.execute(
        "ALTER TABLE call_events ADD CONSTRAINT test_no_poison "
        "CHECK (NOT (event_data ? 'poison')) NOT VALID"
    )
    try:
        ways.clear()
        # The poisoned row makes the batch bisect in the staging table, each part staged in
        # turn within the one transaction.
        result = await write(w, topics, *evs[1:])
    finally:
        await db.execute("ALTER TABLE call_events DROP CONSTRAINT test_no_poison")
    assert "copy" not in ways
    assert ways.count("staged") == 5
    # No statement saw another part's rows: they would come back as skipped keys (stored by
    # then); only the repeat is skipped.
    assert set(_WatchedConnection.skipped) == {(uuid.UUID(evs[1]["id"]), T0 + timedelta(seconds=3))}
    assert [d.reason for d in result.dead_letters] == ["db_rejected"]
    assert (len(result.written), result.duplicates) == (len(evs) - 3, 1)
    ids = await db.fetch("SELECT id FROM call_events WHERE call_id = $1", cid)
    assert sorted(r["id"] for r in ids) == sorted(
        uuid.UUID(e["id"]) for i, e in enumerate(evs) if i != 3
    )
