"""The fence: a writer stores only records at or above the positions stored with the data,
so an owner that lost its partitions cannot store what the next owner stored (BatchWriter
on a real PostgreSQL server)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from ingest.pipeline.sink import Item
from tests.support import (
    Topics,
    consumed,
    initiation_then_responses,
    one_connection_writer,
)

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def at_offsets(topic: str, partition: int, offsets: range, call: uuid.UUID) -> list[Item]:
    """Records of one call at ``offsets`` of ``partition``: an initiation, then responses."""
    events = initiation_then_responses(call, len(offsets), T0)
    return consumed(topic, partition, iter(offsets), events)


async def test_records_below_the_stored_position_are_fenced_and_the_rest_stored(
    db, database_url: str, topics: Topics
) -> None:
    async with (
        one_connection_writer(database_url, topics) as first_owner,
        one_connection_writer(database_url, topics) as late_owner,
    ):
        await first_owner.write(at_offsets(topics.source, 0, range(0, 10), uuid.uuid4()))
        late_call = uuid.uuid4()
        result = await late_owner.write(
            at_offsets(topics.source, 0, range(5, 15), late_call)
            + at_offsets(topics.source, 1, range(0, 3), uuid.uuid4())
        )
    assert (result.fenced, len(result.written), len(result.dead_letters)) == (5, 3, 5)
    assert result.positions == {(topics.source, 0): 15, (topics.source, 1): 3}
    # The late owner's first five records (its call's initiation among them) were fenced,
    # so the rest of that call are events of a call that does not exist.
    assert {dl.reason for dl in result.dead_letters} == {"unknown_call"}
    stored = await db.fetchval("SELECT count(*) FROM call_events WHERE call_id = $1", late_call)
    assert stored == 0


async def test_a_batch_wholly_above_the_stored_positions_fences_nothing(
    db, database_url: str, topics: Topics
) -> None:
    async with one_connection_writer(database_url, topics) as w:
        await w.write(at_offsets(topics.source, 0, range(0, 4), uuid.uuid4()))
        result = await w.write(at_offsets(topics.source, 0, range(4, 8), uuid.uuid4()))
    assert (result.fenced, len(result.written), result.positions) == (
        0,
        4,
        {(topics.source, 0): 8},
    )
