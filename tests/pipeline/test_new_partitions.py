"""Partitions the group has stored nothing for, as a topic's added partitions are: read from
their first record, and looked for at every metadata refresh."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from tests.support import (
    Record,
    call_events,
    drained,
    publish,
    reconcile,
    record,
    running_worker,
    stored_positions,
    worker_env,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _call() -> list[Record]:
    return [record(e) for e in call_events(uuid.uuid4(), T0)]


async def test_a_partition_without_a_stored_position_is_read_from_its_first_record(
    database_url, db, topics
):
    # The group has stored a position for partition 0 only when partition 3 gets records,
    # as for a partition added to the topic: on the next assignment partition 0 resumes at
    # its position and partition 3 starts at its first record, not at its end.
    pub = await publish(topics.bootstrap, topics.source, _call(), partition=0)
    async with running_worker(worker_env(database_url, topics)):
        await drained(db, topics, pub)
    assert await stored_positions(db, topics.group) == {0: 5}

    pub.extend(await publish(topics.bootstrap, topics.source, _call(), partition=3))
    pub.extend(await publish(topics.bootstrap, topics.source, _call(), partition=0))
    async with running_worker(worker_env(database_url, topics)):
        await drained(db, topics, pub)

    assert await stored_positions(db, topics.group) == {0: 10, 3: 5}
    rec = await reconcile(db, topics, pub)
    assert rec.problems == []
    assert rec.stored == 15


async def test_the_consumer_refreshes_its_metadata_at_the_configured_age_without_rebalancing(
    database_url, db, topics
):
    # A refresh is how a running group finds partitions added to its topics; one that finds
    # the same partitions must cost no rebalance, or a short age would stop the group often.
    pub = await publish(topics.bootstrap, topics.source, _call())
    env = worker_env(database_url, topics, KAFKA_METADATA_MAX_AGE_MS="1000")
    async with running_worker(env) as worker:
        await drained(db, topics, pub)
        source = worker.connections.source
        assert source is not None
        generation = source.generation
        refreshes: list[object] = []
        cluster = source.consumer._client.cluster  # aiokafka offers no public hook
        cluster.add_listener(refreshes.append)
        try:
            await asyncio.sleep(4.5)
        finally:
            cluster.remove_listener(refreshes.append)
        assert len(refreshes) >= 3
        assert source.generation == generation

        pub.extend(await publish(topics.bootstrap, topics.source, _call()))
        await drained(db, topics, pub)
        assert source.generation == generation
    rec = await reconcile(db, topics, pub)
    assert rec.problems == []
    assert rec.stored == 10
