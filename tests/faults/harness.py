"""The fault suite's shared harness: a corpus, slow publishing, database faults, and the
one reconciliation every fault test ends with."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
import uuid

import asyncpg
import orjson

from ingest.tools.produce import interleave, invalid_record
from tests.support import (
    Published,
    Record,
    Topics,
    call_mismatches,
    publish,
    reconcile,
)

# Seeds taken in this test session. The fault tests share one database, and a seed gives
# the same call and event ids again (with other times): two tests on one seed would store
# each other's events under other keys and each other's calls, and the reconciliation
# would then judge a mix of both.
_SEEDS_TAKEN: set[int] = set()


def corpus(calls: int, invalid_fraction: float, seed: int) -> tuple[list[Record], list[uuid.UUID]]:
    """Realistic interleaved calls with a share of bad records, and the call ids.

    ``seed`` makes the corpus repeatable; each test takes a seed of its own."""
    if seed in _SEEDS_TAKEN:
        raise ValueError(f"corpus seed {seed} is taken by another test of this session")
    _SEEDS_TAKEN.add(seed)
    rng = random.Random(seed)
    records: list[Record] = []
    ids: set[uuid.UUID] = set()
    for e in interleave(rng, calls):
        ids.add(uuid.UUID(e["call_id"]))
        value = invalid_record(rng, e) if rng.random() < invalid_fraction else orjson.dumps(e)
        records.append((e["call_id"].encode(), value))
    return records, sorted(ids)


async def publish_slowly(
    t: Topics, records: list[Record], chunks: int, pause_s: float
) -> Published:
    pub = Published()
    size = max(1, len(records) // chunks)
    for i in range(0, len(records), size):
        pub.extend(await publish(t.bootstrap, t.source, records[i : i + size]))
        await asyncio.sleep(pause_s)
    return pub


async def assert_reconciled(db: asyncpg.Pool, t: Topics, pub: Published, calls: list[uuid.UUID]):
    rec = await reconcile(db, t, pub)
    assert rec.problems == [], rec.problems[:10]
    accounted = rec.stored + rec.dead_lettered + rec.duplicates
    assert accounted == len(pub.records), (rec, len(pub.records))
    assert await call_mismatches(db, calls) == []
    return rec


async def until_waiting_on_lock(db: asyncpg.Pool, query_like: str, timeout_s: float = 60) -> None:
    """Wait until a session of the worker waits on a lock in a statement like ``query_like``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND application_name = 'ingest' AND query LIKE $1",
            f"%{query_like}%",
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no worker statement like {query_like!r} waited on a lock")


def pg_ctl(action: str) -> list[str] | None:
    """The command that does ``action`` (stop, start, restart) to the PostgreSQL server."""
    custom = os.environ.get(f"TEST_PG_{action.upper()}")
    if custom:
        return custom.split()
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None or os.geteuid() != 0:
        return None
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", action]


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """Wait until ``proc`` (a server the test started) accepts connections on ``port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} after {timeout_s}s")
