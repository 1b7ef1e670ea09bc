"""Other producers' record batches: every Kafka codec, another client library (librdkafka),
and a batch that cannot be decoded, through a real broker, worker and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import asyncpg
import confluent_kafka
import pytest
from prometheus_client import REGISTRY

from ingest.tools.devbroker import free_port
from tests.kafka_wire import produce_raw, record_batch, stored_codecs, with_bad_crc
from tests.support import (
    Published,
    Record,
    Topics,
    WorkerProcess,
    call_events,
    drained,
    eventually,
    http_get,
    http_get_blocking,
    publish,
    reconcile,
    record,
    running_worker,
    stored_positions,
    worker_env,
)

CODECS = ("gzip", "snappy", "lz4", "zstd")


def _calls(n: int) -> list[Record]:
    return [record(e) for _ in range(n) for e in call_events(uuid.uuid4())]


async def _publish_compressed(
    bootstrap: str, topic: str, partition: int, codec: str, records: list[Record]
) -> Published:
    return await publish(bootstrap, topic, records, partition, compression_type=codec, linger_ms=20)


def _publish_with_librdkafka(bootstrap: str, topic: str, records: list[Record]) -> Published:
    """librdkafka's defaults (consistent_random partitioner), lz4 batches."""
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "compression.type": "lz4",
            "linger.ms": 20,
            "enable.idempotence": False,
            "acks": "all",
        }
    )
    delivered: list[tuple[int, int, Record]] = []
    errors: list[str] = []

    def on_delivery(err: confluent_kafka.KafkaError | None, msg: confluent_kafka.Message) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            delivered.append((msg.partition(), msg.offset(), (msg.key(), msg.value())))

    for k, v in records:
        producer.produce(topic, value=v, key=k, on_delivery=on_delivery)
    assert producer.flush(30) == 0, "librdkafka did not deliver everything in 30 s"
    assert errors == []
    out = Published()
    for p, o, rec in delivered:
        out.records.append((p, o, rec))
        out.ends[p] = max(out.ends.get(p, 0), o + 1)
    return out


async def _assert_stored_once(db: asyncpg.Pool, t: Topics, pub: Published) -> None:
    rec = await reconcile(db, t, pub)
    assert rec.problems == []
    assert (rec.stored, rec.dead_lettered, rec.duplicates) == (len(pub.records), 0, 0)


async def test_batches_of_every_codec_are_stored_exactly_once(database_url, db, topics):
    pub = Published()
    for partition, codec in enumerate(CODECS):
        pub.extend(
            await _publish_compressed(topics.bootstrap, topics.source, partition, codec, _calls(8))
        )
    for partition, codec in enumerate(CODECS):
        # The broker keeps the batches as the producer compressed them.
        codecs = set(await stored_codecs(topics.bootstrap, topics.source, partition))
        assert codecs == {codec}
    async with running_worker(worker_env(database_url, topics)):
        await drained(db, topics, pub)
    await _assert_stored_once(db, topics, pub)


async def test_events_from_librdkafka_with_lz4_are_stored_exactly_once(database_url, db, topics):
    pub = await asyncio.to_thread(
        _publish_with_librdkafka, topics.bootstrap, topics.source, _calls(20)
    )
    assert len(pub.ends) > 1, "librdkafka's partitioner put every call on one partition"
    assert set(await stored_codecs(topics.bootstrap, topics.source, next(iter(pub.ends)))) == {
        "lz4"
    }
    async with running_worker(worker_env(database_url, topics)):
        await drained(db, topics, pub)
    await _assert_stored_once(db, topics, pub)


async def _produce_call(bootstrap: str, topic: str, partition: int, pub: Published) -> None:
    """One whole call as one hand-built batch on ``partition`` (so its events stay in order)."""
    call = _calls(1)
    base = await produce_raw(
        bootstrap, topic, partition, record_batch([v for _, v in call], [k for k, _ in call])
    )
    pub.records += [(partition, base + i, rec) for i, rec in enumerate(call)]
    pub.ends[partition] = base + len(call)


@pytest.mark.parametrize("good_before", [False, True], ids=["first-batch", "after-good-records"])
async def test_a_corrupt_batch_stalls_its_partition_and_the_others_keep_flowing(
    database_url, db, topics, good_before
):
    bad_partition = 1
    pub = Published()
    # Records of the same partition before the corrupt batch, and other partitions' records
    # fetched in the same response, must not be lost with the exception it raises.
    if good_before:
        await _produce_call(topics.bootstrap, topics.source, bad_partition, pub)
    corrupt = with_bad_crc(record_batch([b"{}"]))
    bad_offset = await produce_raw(topics.bootstrap, topics.source, bad_partition, corrupt)
    await _produce_call(topics.bootstrap, topics.source, bad_partition, Published())
    for p in (0, 2, 3):
        await _produce_call(topics.bootstrap, topics.source, p, pub)
    async with running_worker(worker_env(database_url, topics)) as worker:
        await drained(db, topics, pub)

        async def reported() -> bool:
            status, body = await http_get(worker.probes.port, "/readyz")
            return (
                status == 503 and f"{topics.source}/{bad_partition} at offset {bad_offset}" in body
            )

        await eventually(reported, 15, "/readyz to name the stalled partition and offset")
        assert REGISTRY.get_sample_value("ingest_partitions_stalled") == 1
        undecodable = REGISTRY.get_sample_value(
            "ingest_undecodable_batches_total", {"topic": topics.source}
        )
        assert undecodable == 1
    # Stopped where it is: stored up to the corrupt batch, and nothing after it skipped to.
    assert (await stored_positions(db, topics.group)).get(bad_partition, 0) == bad_offset
    await _assert_stored_once(db, topics, pub)


async def test_a_codec_without_its_library_stalls_only_that_partition(
    database_url, db, topics, tmp_path: Path
):
    # The worker runs as an image built without the codec libraries would: cramjam (what
    # aiokafka decodes snappy, lz4 and zstd with) fails to import.
    shadow = tmp_path / "no-codecs"
    shadow.mkdir()
    (shadow / "cramjam.py").write_text("raise ImportError('cramjam left out of this image')\n")
    pub = Published()
    for p in (0, 2, 3):
        pub.extend(await _publish_compressed(topics.bootstrap, topics.source, p, "gzip", _calls(2)))
    snappy = await _publish_compressed(topics.bootstrap, topics.source, 1, "snappy", _calls(2))
    port = free_port()
    env = worker_env(
        database_url,
        topics,
        INGEST_HTTP_PORT=str(port),
        PYTHONPATH=os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")]),
    )
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        await drained(db, topics, pub, timeout_s=30)

        async def reported() -> bool:
            status, body = await asyncio.to_thread(http_get_blocking, port, "/readyz")
            return status == 503 and f"{topics.source}/1 at offset 0: UnsupportedCodecError" in body

        await eventually(reported, 15, "/readyz to name the partition with the snappy batch")
        assert worker.alive()
        log = worker.log()
    finally:
        worker.stop()
    stalls = [line for line in log.splitlines() if "record batch cannot be decoded" in line]
    assert len(stalls) == 1, log[-3000:]
    assert "snappy compression codec not found" in stalls[0]
    assert (await stored_positions(db, topics.group)).get(1, 0) == 0
    assert snappy.ends == {1: 10}
    await _assert_stored_once(db, topics, pub)
