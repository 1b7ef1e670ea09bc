"""The broker restarted under a running worker loses nothing.

Tansu keeps its data in an object store here (``s3://``, on a local S3 server from the
``moto`` package): the ``tansu`` binary of the tests is built with that storage engine
only (``postgres://`` answers "FeatureNotEnabled"), and its memory store forgets every
record on stop.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from ingest.tools.devbroker import TansuBroker, free_port
from tests.faults.harness import assert_reconciled, corpus, wait_listening
from tests.support import (
    Topics,
    WorkerProcess,
    create_topics,
    drained,
    eventually,
    publish,
    stored_positions,
    worker_env,
)

pytestmark = pytest.mark.faults

BUCKET = "tansu"


@pytest.fixture(scope="module")
def durable_broker() -> Iterator[TansuBroker]:
    """A Tansu broker whose records live in a local S3 server, so they survive its restart."""
    s3_port = free_port()
    s3 = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{s3_port}"
    credentials = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
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
            storage=f"s3://{BUCKET}/",
            env={**credentials, "AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true"},
        )
        broker.start()
        try:
            yield broker
        finally:
            broker.kill()  # a SIGTERM'd Tansu on s3:// takes 5 s to exit
    finally:
        s3.terminate()
        s3.wait(10)


async def test_a_broker_restarted_mid_drain_loses_and_repeats_nothing(
    database_url, db, durable_broker: TansuBroker, tmp_path: Path
):
    t = Topics.fresh(durable_broker.bootstrap)
    await create_topics(t.bootstrap, {t.source: 4, t.dlq: 1})
    records, calls = corpus(80, 0.02, seed=41)
    half = len(records) // 2
    pub = await publish(t.bootstrap, t.source, records[:half])
    env = worker_env(database_url, t, INGEST_BATCH_MAX_EVENTS="50")
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:

        async def started() -> bool:
            return sum((await stored_positions(db, t.group)).values()) > 0

        await eventually(started, 30, "the worker to store its first batch")
        durable_broker.kill()  # a crash: only what it had written to storage survives
        stored_at_stop = sum((await stored_positions(db, t.group)).values())
        await asyncio.sleep(2)
        durable_broker.start()
        pub.extend(await publish(t.bootstrap, t.source, records[half:]))
        await drained(db, t, pub, timeout_s=60)
        assert worker.alive()
    finally:
        worker.stop()
    assert stored_at_stop < half, "the drain had finished before the broker stopped"
    rec = await assert_reconciled(db, t, pub, calls)
    assert rec.dead_lettered > 0
