"""One row per event id, whatever the producer does with ``created_at``: an id stored within
``INGEST_DEDUP_WINDOW`` of an event's time is a repeat. The BatchWriter on a real PostgreSQL
server and on a real TimescaleDB (skipped, saying why, when none answers), dead letters on a
real broker."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import orjson
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from ingest.pipeline.contract import RecordRef, decode
from ingest.pipeline.sink import (
    _RECENT_IDS,
    HYPERTABLE_LOOK_BACK,
    BatchWriter,
    Item,
    WriteResult,
)
from tests.conftest import _drop_timescale_database, _migrated_timescale_database
from tests.support import Topics, call_events, event, one_connection_writer

WINDOW = timedelta(hours=24)
# Recent, so that TimescaleDB's compression policy (chunks older than 7 days) leaves the
# chunks written here alone, and far enough back that T0 + a day is still in the past.
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
_offsets = itertools.count()


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=["PostgreSQL", "TimescaleDB"])
async def server_url(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[str]:
    """A migrated database on each server; the TimescaleDB one skips when none answers."""
    if request.param == "PostgreSQL":
        yield database_url
        return
    url = await _migrated_timescale_database()
    yield url
    await _drop_timescale_database(url)


@pytest_asyncio.fixture(loop_scope="session")
async def db(server_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(server_url, min_size=1, max_size=2)
    yield pool
    await pool.close()


@pytest_asyncio.fixture(loop_scope="session")
async def writer(server_url: str, topics: Topics) -> AsyncIterator[BatchWriter]:
    """A BatchWriter with a dedup window of a day."""
    async with one_connection_writer(server_url, topics, dedup_window=WINDOW) as w:
        yield w


@pytest_asyncio.fixture(loop_scope="session")
async def keys_only(server_url: str, topics: Topics) -> AsyncIterator[BatchWriter]:
    """A BatchWriter with the dedup window off (``INGEST_DEDUP_WINDOW=off``)."""
    async with one_connection_writer(server_url, topics, dedup_window=None) as w:
        yield w


def item(topic: str, e: dict[str, Any], timestamp_ms: int = -1) -> Item:
    """A consumed record of ``e`` with the record timestamp ``timestamp_ms``."""
    ref = RecordRef(topic, 0, next(_offsets))
    value = orjson.dumps(e)
    return Item(ref, None, value, decode(value, ref, timestamp_ms), timestamp_ms)


async def write(w: BatchWriter, topics: Topics, *events: dict[str, Any]) -> WriteResult:
    return await w.write([item(topics.source, e) for e in events])


def at(e: dict[str, Any], delta: timedelta, **changes: Any) -> dict[str, Any]:
    """``e`` again with its ``created_at`` moved by ``delta``."""
    moved = datetime.fromisoformat(e["created_at"]) + delta
    return {**e, "created_at": moved.isoformat(), **changes}


def without_created_at(e: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in e.items() if k != "created_at"}


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


async def stored_times(db: asyncpg.Pool, event_id: str) -> list[datetime]:
    rows = await db.fetch(
        "SELECT created_at FROM call_events WHERE id = $1 ORDER BY created_at",
        uuid.UUID(event_id),
    )
    return [r["created_at"] for r in rows]


def counts(r: WriteResult) -> tuple[int, int, int]:
    """(written, duplicates, dead letters) of a batch."""
    return len(r.written), r.duplicates, len(r.dead_letters)


# --- with created_at in the payload ----------------------------------------------------------


async def test_a_retry_with_a_later_created_at_within_the_window_is_a_duplicate(db, writer, topics):
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    await write(writer, topics, init, answer)
    result = await write(writer, topics, at(answer, timedelta(hours=23)))
    assert counts(result) == (0, 1, 0)
    assert await stored_times(db, answer["id"]) == [datetime.fromisoformat(answer["created_at"])]


async def test_a_copy_published_late_with_an_earlier_created_at_within_the_window_is_a_duplicate(
    db, writer, topics
):
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    await write(writer, topics, init, answer)
    result = await write(writer, topics, at(answer, -timedelta(hours=23)))
    assert counts(result) == (0, 1, 0)
    assert await stored_times(db, answer["id"]) == [datetime.fromisoformat(answer["created_at"])]


async def test_a_late_repeat_among_fresh_events_is_found_in_a_range_of_its_own(db, writer, topics):
    long_ago = T0 - timedelta(days=30)
    init, answer = call_events(uuid.uuid4(), long_ago)[:2]
    await write(writer, topics, init, answer)
    fresh = call_events(uuid.uuid4(), T0)
    result = await write(writer, topics, *fresh, at(answer, timedelta(hours=1)))
    assert counts(result) == (len(fresh), 1, 0)
    assert len(await stored_times(db, answer["id"])) == 1


async def test_the_same_id_beyond_the_window_is_stored_as_another_event(db, writer, topics):
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    await write(writer, topics, init, answer)
    result = await write(writer, topics, at(answer, WINDOW + timedelta(hours=1)))
    assert counts(result) == (1, 0, 0)
    assert len(await stored_times(db, answer["id"])) == 2


async def test_within_a_batch_a_repeat_of_an_id_within_the_window_is_dropped_and_the_first_wins(
    db, writer, topics
):
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    result = await write(
        writer, topics, init, answer, at(answer, timedelta(hours=2), event_data={"copy": True})
    )
    assert counts(result) == (2, 1, 0)
    rows = await db.fetch(
        "SELECT created_at, event_data FROM call_events WHERE id = $1", uuid.UUID(answer["id"])
    )
    assert [(r["created_at"], orjson.loads(r["event_data"])) for r in rows] == [
        (datetime.fromisoformat(answer["created_at"]), answer["event_data"])
    ]


async def test_within_a_batch_the_same_id_beyond_the_window_is_another_event(db, writer, topics):
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    result = await write(writer, topics, init, answer, at(answer, WINDOW + timedelta(hours=1)))
    assert counts(result) == (3, 0, 0)


async def test_with_the_window_off_the_same_id_at_another_created_at_is_another_event(
    db, keys_only, topics
):
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    await write(keys_only, topics, init, answer)
    result = await write(keys_only, topics, at(answer, timedelta(minutes=1)), answer)
    assert counts(result) == (1, 1, 0)
    assert len(await stored_times(db, answer["id"])) == 2


async def test_an_id_reused_by_a_call_begun_in_the_batch_is_another_event(db, writer, topics):
    # The look-back asks only about events of calls stored before the batch: a call begun in
    # it has no stored events, so an id it shares with another call's is that call's own.
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    await write(writer, topics, init, answer)
    other = call_events(uuid.uuid4(), T0 + timedelta(minutes=1))[0]
    reused = event(
        uuid.UUID(other["call_id"]),
        "answer",
        at=T0 + timedelta(minutes=2),
        event_id=uuid.UUID(answer["id"]),
    )
    result = await write(writer, topics, other, reused)
    assert counts(result) == (2, 0, 0)
    assert len(await stored_times(db, answer["id"])) == 2


# --- what the look-back reports ------------------------------------------------------------


def look_backs() -> tuple[float, float]:
    """(batches that looked back, events asked about) so far in this process."""
    return (
        REGISTRY.get_sample_value("ingest_dedup_look_back_seconds_count") or 0.0,
        REGISTRY.get_sample_value("ingest_dedup_look_back_events_total") or 0.0,
    )


async def test_a_batch_with_events_of_stored_calls_reports_its_look_back_and_the_ids_asked(
    db, writer, topics
):
    init, answer, transcription = call_events(uuid.uuid4(), T0)[:3]
    await write(writer, topics, init)
    batches, asked = look_backs()
    fresh = call_events(uuid.uuid4(), T0)
    await write(writer, topics, *fresh, answer, transcription)
    assert look_backs() == (batches + 1, asked + 2)


async def test_a_batch_of_calls_begun_in_it_does_not_look_back(db, writer, topics):
    before = look_backs()
    await write(writer, topics, *call_events(uuid.uuid4(), T0))
    assert look_backs() == before


async def test_with_the_window_off_no_batch_looks_back(db, keys_only, topics):
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    await write(keys_only, topics, init)
    before = look_backs()
    await write(keys_only, topics, answer)
    assert look_backs() == before


# --- without created_at: the record timestamp is the event's time ----------------------------


async def test_without_created_at_a_republish_with_a_new_record_timestamp_is_a_duplicate(
    db, writer, topics
):
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    bare = without_created_at(answer)
    first = item(topics.source, bare, ms(T0 + timedelta(seconds=3)))
    await writer.write([item(topics.source, init), first])
    # An application-level retry a few minutes later: the broker stamps it anew.
    retry = item(topics.source, bare, ms(T0 + timedelta(minutes=5)))
    result = await writer.write([retry])
    assert counts(result) == (0, 1, 0)
    assert await stored_times(db, answer["id"]) == [T0 + timedelta(seconds=3)]


async def test_without_created_at_a_republish_beyond_the_window_is_stored_again(db, writer, topics):
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    bare = without_created_at(answer)
    await writer.write([item(topics.source, init), item(topics.source, bare, ms(T0))])
    later = item(topics.source, bare, ms(T0 + WINDOW + timedelta(minutes=1)))
    result = await writer.write([later])
    assert counts(result) == (1, 0, 0)
    assert await stored_times(db, answer["id"]) == [T0, T0 + WINDOW + timedelta(minutes=1)]


async def test_without_created_at_and_the_window_off_a_republish_is_stored_twice(
    db, keys_only, topics
):
    init, answer = call_events(uuid.uuid4(), T0)[:2]
    bare = without_created_at(answer)
    await keys_only.write([item(topics.source, init), item(topics.source, bare, ms(T0))])
    result = await keys_only.write([item(topics.source, bare, ms(T0 + timedelta(minutes=5)))])
    assert counts(result) == (1, 0, 0)


# --- only events actually inserted touch calls and agents -----------------------------------


async def test_a_retried_initiation_changes_neither_the_call_nor_its_agent(db, writer, topics):
    agent = await db.fetchval(
        "INSERT INTO agents (name, voice_model, context_prompt) VALUES ('a', 'v', 'p') RETURNING id"
    )
    cid = uuid.uuid4()
    init = event(
        cid,
        "initiation",
        {"from_number": "+14155550100", "to_number": "+14155550199", "agent_id": str(agent)},
        at=T0,
    )
    await write(writer, topics, init)
    before = await db.fetchrow("SELECT * FROM calls WHERE id = $1", cid)
    retry = at(
        init, timedelta(minutes=10), event_data={**init["event_data"], "to_number": "+14155550142"}
    )
    result = await write(writer, topics, retry)
    assert counts(result) == (0, 1, 0)
    assert await db.fetchrow("SELECT * FROM calls WHERE id = $1", cid) == before
    assert await db.fetchval("SELECT last_used_at FROM agents WHERE id = $1", agent) == T0


async def test_a_retried_initiation_in_the_batch_that_begins_the_call_begins_it_once(
    db, writer, topics
):
    cid = uuid.uuid4()
    init, answer = call_events(cid, T0)[:2]
    result = await write(writer, topics, init, at(init, timedelta(minutes=1)), answer)
    assert counts(result) == (2, 1, 0)
    row = await db.fetchrow("SELECT status, created_at FROM calls WHERE id = $1", cid)
    assert (row["status"], row["created_at"]) == ("in_progress", T0)


async def test_a_termination_repeated_with_another_created_at_neither_counts_nor_moves_the_end(
    db, writer, topics
):
    cid = uuid.uuid4()
    evs = call_events(cid, T0)
    first = await write(writer, topics, *evs)
    termination = evs[-1]
    again = await write(writer, topics, at(termination, timedelta(minutes=2)))
    assert (first.terminated, again.terminated, again.duplicates) == (1, 0, 1)
    ended_at = await db.fetchval("SELECT ended_at FROM calls WHERE id = $1", cid)
    assert ended_at == datetime.fromisoformat(termination["created_at"])


# --- the look-back reads only the chunks in its range (TimescaleDB) --------------------------


def _executed_relations(plan: dict[str, Any]) -> set[str]:
    """Relations scanned by the nodes of ``plan`` that ran at least once."""
    out: set[str] = set()
    # The hypertable's own node (ChunkAppend) names call_events; its children the chunks.
    if (
        plan.get("Actual Loops", 0) > 0
        and plan.get("Relation Name", "call_events") != "call_events"
    ):
        out.add(plan["Relation Name"])
    for child in plan.get("Plans", []):
        out |= _executed_relations(child)
    return out


async def test_the_look_back_reads_only_the_uncompressed_chunks_of_its_range(
    server_url, db, writer, topics
):
    if not await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
    ):
        pytest.skip("chunks are TimescaleDB's: nothing to exclude on plain PostgreSQL")
    now = datetime.now(UTC) - timedelta(hours=1)
    # Compressed chunks (40, 20, 10 days back), an uncompressed one out of range (3), today.
    for days in (40, 20, 10, 3, 0):
        await write(writer, topics, *call_events(uuid.uuid4(), now - timedelta(days=days)))
    await db.execute(
        "SELECT compress_chunk(c, if_not_compressed => true) "
        "FROM show_chunks('call_events', older_than => now() - interval '7 days') AS c"
    )
    low, high = now - timedelta(minutes=5) - WINDOW, now + timedelta(minutes=5) + WINDOW
    in_range = {
        r["chunk_name"]
        for r in await db.fetch(
            "SELECT chunk_name FROM timescaledb_information.chunks "
            "WHERE hypertable_name = 'call_events' AND range_end > $1 AND range_start <= $2",
            low,
            high,
        )
    }
    async with db.acquire() as conn:
        # Planned for its bounds, as the worker plans each run on a hypertable.
        plan = await _plan(conn, _RECENT_IDS, 100, low, high, "force_custom_plan", analyze=True)
    scanned = _executed_relations(plan["Plan"])
    all_chunks = await db.fetchval(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'call_events'"
    )
    assert all_chunks > len(in_range)
    assert scanned
    assert scanned <= in_range, (scanned, in_range)


async def test_on_a_hypertable_each_look_back_is_planned_for_its_own_bounds(server_url, db):
    # A cached statement's generic plan names every chunk: building it opened them all (about
    # 100 ms per session at a year of daily chunks) and each run locked them all.
    if not await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
    ):
        pytest.skip("plain PostgreSQL keeps one cached statement: no chunks to name")
    ids = [uuid.uuid4() for _ in range(20)]
    statements = (
        "SELECT custom_plans, generic_plans FROM pg_prepared_statements WHERE statement = $1"
    )
    async with db.acquire() as conn:
        # Prepared before: asyncpg closes unused statements when it prepares a new one.
        await conn.fetch(statements, _RECENT_IDS)
        for _ in range(8):
            await HYPERTABLE_LOOK_BACK.fetch(conn, ids, T0 - WINDOW, T0 + WINDOW)
        runs = await conn.fetch(statements, _RECENT_IDS)
    # The last run's statement: run once, planned for its bounds (a cached one: 8 runs).
    assert [(r["custom_plans"], r["generic_plans"]) for r in runs] == [(1, 0)]


async def _plan(
    conn: asyncpg.Connection,
    query: str,
    n_ids: int,
    low: datetime,
    high: datetime,
    mode: str,
    analyze: bool = False,
) -> dict[str, Any]:
    """The plan of look-back ``query`` for ``n_ids`` new ids, prepared under ``mode``."""
    ids = "{" + ",".join(str(uuid.uuid4()) for _ in range(n_ids)) + "}"
    await conn.execute(f"SET plan_cache_mode = {mode}")
    await conn.execute(f"PREPARE look_back(uuid[], timestamptz, timestamptz) AS {query}")
    try:
        raw = await conn.fetchval(
            f"EXPLAIN ({'ANALYZE, ' if analyze else ''}FORMAT JSON) EXECUTE look_back"
            f"('{ids}', '{low.isoformat()}', '{high.isoformat()}')"
        )
    finally:
        await conn.execute("DEALLOCATE look_back; RESET plan_cache_mode")
    (plan,) = orjson.loads(raw)
    return cast(dict[str, Any], plan)


def _indexes_used(node: dict[str, Any]) -> set[str]:
    found = {node["Index Name"]} if "Index Name" in node else set()
    for child in node.get("Plans", []):
        found |= _indexes_used(child)
    return found


async def test_the_look_back_probes_the_key_even_when_statistics_take_the_newest_day_for_empty(
    server_url, db, writer, topics
):
    # A large table's statistics lag behind its newest day (autoanalyze waits for a tenth of
    # it to change). Planned on them, a range on created_at looks empty, and a probe per id
    # through the created_at index read the whole day once per id: 20 s per batch, every
    # write timed out, on the bench's year of history.
    timescale = "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
    if await db.fetchval(timescale):
        pytest.skip("plain PostgreSQL's plan: a hypertable's chunks have their own statistics")
    await write(writer, topics, *call_events(uuid.uuid4(), T0 - timedelta(days=60)))
    await db.execute("ANALYZE call_events")
    call = uuid.uuid4()
    await write(writer, topics, *call_events(call, T0))
    await db.execute(
        "INSERT INTO call_events (id, call_id, event_type, event_data, created_at) "
        "SELECT gen_random_uuid(), $1, 'transcription', '{}', "
        "$2::timestamptz + n * interval '1 ms' "
        "FROM generate_series(1, 20000) AS n",
        call,
        T0,
    )
    async with db.acquire() as conn:
        query = (await writer._look_back(conn)).query
        plan = await _plan(conn, query, 50, T0 - WINDOW, T0 + WINDOW, "force_custom_plan")
    assert _indexes_used(plan["Plan"]) == {"call_events_pkey"}
