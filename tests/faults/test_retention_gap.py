"""Records deleted from the broker before they were stored (a retention gap): held by
default until an operator accepts the loss, skipped with ``INGEST_ON_RETENTION_GAP=skip``.

What the test broker supports: Tansu 0.6 (the ``tansu`` binary of the tests, built with
its object-store engine only) has no retention and answers DeleteRecords by dropping the
connection (its engine leaves it unimplemented). Its object store is a plain bucket, one
object per record batch, and the log start it answers (ListOffsets earliest) is its oldest
remaining batch: deleting the oldest batch objects of a partition from the bucket is what
retention does to a log's oldest segments. So the broker here keeps its records in a local
S3 server (``moto``), and the test deletes the batches below a point.

Tansu then serves a fetch below its log start with the next records it holds, where Apache
Kafka answers OFFSET_OUT_OF_RANGE. Every client flow here passes through a proxy that gives
Kafka's answer for the partitions whose batches the test deleted (``kafka_log_start``), so
that a gap met by a running worker at fetch time is tested as well as the one the check on
assignment finds (the stored position against the log start).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition

from ingest.tools.devbroker import TansuBroker, free_port
from tests.faults.harness import assert_reconciled, corpus, wait_listening
from tests.faults.kafka_log_start import LogStartProxy
from tests.support import (
    Published,
    Topics,
    WorkerProcess,
    create_topics,
    drained,
    eventually,
    http_get_blocking,
    publish,
    stored_positions,
    worker_env,
)

pytestmark = pytest.mark.faults

BUCKET = "tansu"
CLUSTER = "tansu_cluster"  # Tansu's default --cluster-id: the first part of its object keys
GAP_PARTITION = 0


@dataclass
class DurableBroker:
    """A Tansu broker whose record batches are objects in a bucket the test can reach,
    behind a proxy on ``proxy_port`` (the address its metadata advertises)."""

    broker: TansuBroker
    s3: Any  # boto3's S3 client (untyped)
    proxy_port: int
    proxy: LogStartProxy | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    def delete_batches_below(self, topic: str, partition: int, offset: int) -> int:
        """Delete the partition's record batches that start below ``offset``, as retention
        deletes a log's oldest segments, and have fetches below it refused as Kafka does;
        returns how many batches were deleted."""
        assert self.proxy is not None
        self.proxy.log_start[(topic, partition)] = offset
        prefix = f"clusters/{CLUSTER}/topics/{topic}/partitions/{partition:0>10}/records/"
        doomed = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for obj in page.get("Contents", []):
                if int(obj["Key"].rsplit("/", 1)[1].split(".")[0]) < offset:
                    doomed.append(obj["Key"])
        for key in doomed:
            self.s3.delete_object(Bucket=BUCKET, Key=key)
        return len(doomed)


@pytest.fixture(scope="module")
def durable_broker() -> Iterator[DurableBroker]:
    s3_port, proxy_port = free_port(), free_port()
    s3 = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{s3_port}"
    try:
        wait_listening(s3_port, s3)
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        client.create_bucket(Bucket=BUCKET)
        broker = TansuBroker(
            advertised=f"127.0.0.1:{proxy_port}",
            storage=f"s3://{BUCKET}/",
            env={
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT": endpoint,
                "AWS_ALLOW_HTTP": "true",
            },
        )
        broker.start()
        try:
            yield DurableBroker(broker, client, proxy_port)
        finally:
            broker.kill()  # a SIGTERM'd Tansu on s3:// takes 5 s to exit
    finally:
        s3.terminate()
        s3.wait(10)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gap_broker(durable_broker: DurableBroker) -> AsyncIterator[DurableBroker]:
    """The durable broker with its proxy serving (in the tests' event loop)."""
    proxy = LogStartProxy(("127.0.0.1", durable_broker.broker.port), durable_broker.proxy_port)
    await proxy.start()
    durable_broker.proxy = proxy
    try:
        yield durable_broker
    finally:
        durable_broker.proxy = None
        await proxy.stop()


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
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _log_lines(worker: WorkerProcess, event: str) -> list[dict[str, Any]]:
    return [
        entry
        for line in worker.log().splitlines()
        if line.startswith("{")
        and str((entry := orjson.loads(line)).get("event", "")).startswith(event)
    ]


async def _log_start(bootstrap: str, tp: TopicPartition) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        return int((await consumer.beginning_offsets([tp]))[tp])
    finally:
        await consumer.stop()


def _only(pub: Published, keep: Callable[[int, int], bool]) -> Published:
    out = Published()
    for partition, offset, rec in pub.records:
        if keep(partition, offset):
            out.records.append((partition, offset, rec))
            out.ends[partition] = max(out.ends.get(partition, 0), offset + 1)
    return out


@dataclass
class Gap:
    """A topic whose partition ``GAP_PARTITION`` lost records the group had not stored."""

    topics: Topics
    first: Published  # stored before the gap opened
    second: Published  # deleted on the gap partition (the part the worker had not read)
    last: Published  # at and after the new log start
    stored_position: int  # the gap partition's stored position when the gap opened
    log_start: int
    calls: list[Any]

    def survivors(self, read_up_to: int) -> Published:
        """Every record that can be stored when the gap partition had been read (and the
        records in flight stored) up to ``read_up_to``."""
        out = Published()
        out.extend(self.first)
        out.extend(_only(self.second, lambda p, o: p != GAP_PARTITION or o < read_up_to))
        out.extend(self.last)
        return out

    def lost(self, read_up_to: int) -> Published:
        return _only(self.second, lambda p, o: p == GAP_PARTITION and o >= read_up_to)


async def _topics(broker: DurableBroker) -> Topics:
    t = Topics.fresh(broker.bootstrap)
    await create_topics(t.bootstrap, {t.source: 2, t.dlq: 1})
    return t


async def _open_gap(
    broker: DurableBroker,
    db: Any,
    t: Topics,
    worker: WorkerProcess,
    seed: int,
    keep_running: bool,
) -> Gap:
    """``worker`` stores a first third; then, with the worker stopped (or frozen, when
    ``keep_running``), the rest is published in two parts and the gap partition's batches
    below the last part are deleted: the second part is lost there."""
    records, calls = corpus(45, 0.0, seed=seed)
    third = len(records) // 3
    first = await publish(t.bootstrap, t.source, records[:third])
    worker.start()
    try:
        await drained(db, t, first, timeout_s=90)
    finally:
        if keep_running:
            # Frozen (SIGSTOP) for a moment shorter than its session timeout: it reads
            # nothing while retention deletes what it has not read yet, and stays in the group.
            worker.signal(signal.SIGSTOP)
            # A fetch it sent before the freeze waits at the broker for records (up to
            # KAFKA_FETCH_MAX_WAIT_MS): answered once the next part is published, it would
            # hand the frozen worker records that are deleted next, possibly every one of
            # them on the gap partition, and the worker would then never meet the gap.
            assert broker.proxy is not None
            await broker.proxy.fetches_answered(timeout_s=10)
        else:
            worker.signal(signal.SIGTERM)
            assert await asyncio.to_thread(worker.wait, 40) == 0
    try:
        second = await publish(t.bootstrap, t.source, records[third : 2 * third])
        last = await publish(t.bootstrap, t.source, records[2 * third :])
        start = min(o for p, o, _ in last.records if p == GAP_PARTITION)
        assert broker.delete_batches_below(t.source, GAP_PARTITION, start) > 0
    finally:
        if keep_running:
            worker.signal(signal.SIGCONT)
    tp = TopicPartition(t.source, GAP_PARTITION)
    assert await _log_start(t.bootstrap, tp) == start, "the broker's log start did not move"

    stored = (await stored_positions(db, t.group))[GAP_PARTITION]
    assert stored < start
    gap = Gap(t, first, second, last, stored, start, calls)
    assert gap.lost(stored).records, "the corpus put nothing of the second part on partition 0"
    return gap


async def _metric(port: int, line_start: str) -> float | None:
    _, text = await asyncio.to_thread(http_get_blocking, port, "/metrics")
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return None


async def _ids_stored(db: Any, pub: Published) -> int:
    ids = [orjson.loads(v)["id"] for _, _, (_, v) in pub.records if v is not None]
    query = "SELECT count(*) FROM call_events WHERE id = ANY($1::uuid[])"
    return int(await db.fetchval(query, ids))


async def _held_until_the_logged_reset(
    worker: WorkerProcess, gap: Gap, db: Any, port: int, env: dict[str, str], found: str
) -> int:
    """The gap partition is held (error line, /readyz, gauges) while the other drains;
    the reset command from the error line releases it without a restart. Returns the
    position the partition was held at."""
    t = gap.topics
    others = _only(gap.survivors(gap.log_start), lambda p, _: p != GAP_PARTITION)
    await drained(db, t, others, timeout_s=90)

    async def said() -> bool:
        return bool(_log_lines(worker, "records were deleted from the broker"))

    await eventually(said, 30, "the retention-gap error")
    (error,) = _log_lines(worker, "records were deleted from the broker")
    assert error["level"] == "error"
    assert (error["topic"], error["partition"]) == (t.source, GAP_PARTITION)
    assert error["found"] == found
    held_at = error["stored_position"]
    assert gap.stored_position <= held_at < gap.log_start
    assert error["log_start"] == gap.log_start
    assert error["lost"] == gap.log_start - held_at
    assert error["run"] == (
        f"ingest positions reset --group {t.group} --topic {t.source} "
        f"--partition {GAP_PARTITION} --to-earliest --force"
    )

    async def unready() -> bool:
        status, body = await asyncio.to_thread(http_get_blocking, port, "/readyz")
        return status == 503 and "retention gap" in body and error["run"] in body

    await eventually(unready, 15, "/readyz 503 naming the gap and its reset")
    assert await _metric(port, "ingest_partitions_at_retention_gap") == 1.0
    assert await _metric(port, "ingest_partitions_held") == 1.0
    # Held through several rechecks: nothing read, nothing skipped, said once.
    await asyncio.sleep(12)
    assert (await stored_positions(db, t.group))[GAP_PARTITION] == held_at
    assert len(_log_lines(worker, "records were deleted from the broker")) == 1

    reset_at = time.monotonic()
    code, out, err = await _ingest_cli(env, *error["run"].split()[1:])
    assert code == 0, (out, err)
    assert f"{t.source}/{GAP_PARTITION}: moved {held_at} -> {gap.log_start}" in out

    # Without a restart: the recheck finds the position fitting and resumes there.
    await drained(db, t, gap.survivors(held_at), timeout_s=60)

    async def ready() -> bool:
        status, _ = await asyncio.to_thread(http_get_blocking, port, "/readyz")
        return status == 200

    await eventually(ready, 15, "/readyz 200 after the reset")
    assert await _metric(port, "ingest_partitions_at_retention_gap") == 0.0
    assert worker.alive()
    print(
        f"\ngap found at {found}: held at {held_at}, log start {gap.log_start}, "
        f"{error['lost']} records lost; drained {time.monotonic() - reset_at:.1f} s after "
        "the reset command started"
    )
    return held_at


async def test_a_retention_gap_found_on_assignment_holds_the_partition_until_the_logged_reset(
    database_url, db, gap_broker: DurableBroker, tmp_path: Path
):
    t = await _topics(gap_broker)
    port = free_port()
    env = worker_env(database_url, t, INGEST_HTTP_PORT=str(port))
    before = WorkerProcess(env, tmp_path / "before.log")
    gap = await _open_gap(gap_broker, db, t, before, seed=161, keep_running=False)
    worker = WorkerProcess(env, tmp_path / "held.log").start()
    try:
        held_at = await _held_until_the_logged_reset(worker, gap, db, port, env, found="assignment")
    finally:
        worker.stop()
    assert held_at == gap.stored_position
    await assert_reconciled(db, t, gap.survivors(held_at), gap.calls)
    assert await _ids_stored(db, gap.lost(held_at)) == 0


async def test_a_retention_gap_met_at_fetch_by_a_running_worker_holds_the_partition_the_same_way(
    database_url, db, gap_broker: DurableBroker, tmp_path: Path
):
    assert gap_broker.proxy is not None
    t = await _topics(gap_broker)
    port = free_port()
    # A session long enough to outlast the freeze: the worker stays in the group, so the
    # gap is met by its next fetch, not by a new assignment.
    env = worker_env(
        database_url,
        t,
        INGEST_HTTP_PORT=str(port),
        KAFKA_SESSION_TIMEOUT_MS="15000",
        KAFKA_HEARTBEAT_INTERVAL_MS="1000",
    )
    worker = WorkerProcess(env, tmp_path / "running.log")
    try:
        gap = await _open_gap(gap_broker, db, t, worker, seed=163, keep_running=True)
        held_at = await _held_until_the_logged_reset(worker, gap, db, port, env, found="fetch")
        assert held_at == gap.stored_position
        assert gap_broker.proxy.refused > 0
    finally:
        worker.stop()
    await assert_reconciled(db, t, gap.survivors(held_at), gap.calls)
    assert await _ids_stored(db, gap.lost(held_at)) == 0


async def test_with_skip_a_retention_gap_resumes_at_the_log_start_counted_and_said_once(
    database_url, db, gap_broker: DurableBroker, tmp_path: Path
):
    t = await _topics(gap_broker)
    port = free_port()
    env = worker_env(database_url, t, INGEST_HTTP_PORT=str(port), INGEST_ON_RETENTION_GAP="skip")
    before = WorkerProcess(env, tmp_path / "before.log")
    gap = await _open_gap(gap_broker, db, t, before, seed=162, keep_running=False)
    worker = WorkerProcess(env, tmp_path / "skip.log").start()
    try:
        await drained(db, t, gap.survivors(gap.stored_position), timeout_s=90)
        errors = _log_lines(worker, "records were deleted from the broker")
        assert len(errors) == 1, errors
        assert "resuming at the earliest record" in errors[0]["event"]
        assert errors[0]["lost"] == gap.log_start - gap.stored_position
        resets = await _metric(port, f'ingest_offset_resets_total{{topic="{t.source}"}}')
        assert resets == 1.0
        assert await _metric(port, "ingest_partitions_held") == 0.0
        status, _ = await asyncio.to_thread(http_get_blocking, port, "/readyz")
        assert status == 200
        print(f"\nskip: {errors[0]['lost']} records lost, resumed at {gap.log_start}")
    finally:
        worker.stop()
    await assert_reconciled(db, t, gap.survivors(gap.stored_position), gap.calls)
    assert await _ids_stored(db, gap.lost(gap.stored_position)) == 0
