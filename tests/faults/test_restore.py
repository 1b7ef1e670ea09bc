"""A database restored from a backup taken mid-drain: the worker refills it from Kafka, exactly.

The worker keeps its Kafka positions in the database with the events, in the same
transactions, so a ``pg_dump`` (one snapshot for every table) holds positions that match
its events exactly. Pointed at the restored database, a worker re-reads each partition from
the position in the backup and stores what came after, as long as the broker still holds
those records (else see the retention-gap tests).

The backup and the restore are the platform's: ``pg_dump -Fc`` and ``pg_restore`` into a
new database; on TimescaleDB with its ``timescaledb_pre_restore()`` before and
``timescaledb_post_restore()`` after. ``pg_dump`` and ``pg_restore`` come from
``PG_BINDIR`` when set, else from ``PATH``; the test skips when they are missing or older
than the server.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from tests.conftest import (
    TEST_DATABASE_URL,
    TIMESCALEDB_URL,
    _create_database,
    _drop_database,
    _timescaledb_admin,
)
from tests.faults.harness import assert_reconciled, corpus, publish_slowly
from tests.support import (
    Topics,
    WorkerProcess,
    create_topics,
    drained,
    eventually,
    migrate,
    read_topic,
    stored_positions,
    worker_env,
)

pytestmark = pytest.mark.faults

SEEDS = {"postgresql": 171, "timescaledb": 172}


def _pg_tool(name: str, server_major: int) -> str:
    """The path of ``name`` (pg_dump, pg_restore) for a server of ``server_major``, or skip:
    a pg_dump older than the server refuses to dump it."""
    bindir = os.environ.get("PG_BINDIR")
    path = str(Path(bindir) / name) if bindir else shutil.which(name)
    if path is None or not os.access(path, os.X_OK):
        pytest.skip(f"{name} not found (install the PostgreSQL client, or set PG_BINDIR)")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"(\d+)(?:\.\d+)?", out)
    if found is None or int(found.group(1)) < server_major:
        pytest.skip(f"{path} is {out.strip()!r}; the server is PostgreSQL {server_major}")
    return path


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}: {err.decode()[-2000:]}"


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@dataclass
class Server:
    """A database server the test backs up from and restores into."""

    name: str
    admin_url: str
    # Creates an empty database on the server (skips when there is no such server).
    create: Callable[[], Awaitable[str]]

    async def major(self) -> int:
        conn = await asyncpg.connect(self.admin_url)
        try:
            return int(await conn.fetchval("SHOW server_version_num")) // 10_000
        finally:
            await conn.close()

    async def restore(self, pg_restore: str, dump: Path, url: str) -> None:
        """The restore procedure of docs/operations.md, into the new empty database ``url``."""
        if self.name == "timescaledb":
            # The extension first, then restore mode: its catalog rows come from the dump,
            # and its background jobs stay stopped until the post-restore call.
            await _execute(url, "CREATE EXTENSION IF NOT EXISTS timescaledb")
            await _execute(url, "SELECT timescaledb_pre_restore()")
        # No --jobs: TimescaleDB's catalog must be restored in one session.
        await _run(pg_restore, "--no-password", "--exit-on-error", f"--dbname={url}", str(dump))
        if self.name == "timescaledb":
            await _execute(url, "SELECT timescaledb_post_restore()")


async def _timescale_create() -> str:
    admin = await _timescaledb_admin()  # skips with the reason when there is none
    await admin.close()
    return await _create_database(TIMESCALEDB_URL, "ingest_restore")


async def _postgres_create() -> str:
    return await _create_database(TEST_DATABASE_URL, "ingest_restore")


@pytest_asyncio.fixture(params=["postgresql", "timescaledb"], loop_scope="session")
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    if request.param == "postgresql":
        yield Server("postgresql", TEST_DATABASE_URL, _postgres_create)
    else:
        yield Server("timescaledb", TIMESCALEDB_URL, _timescale_create)


@pytest_asyncio.fixture(loop_scope="session")
async def databases(server: Server) -> AsyncIterator[tuple[str, str]]:
    """The live database (migrated) and an empty one to restore its backup into."""
    live = await server.create()
    restored = await server.create()
    try:
        await migrate(live)
        yield live, restored
    finally:
        for url in (live, restored):
            await _drop_database(server.admin_url, url)


async def test_a_backup_taken_mid_drain_and_restored_into_a_new_database_is_refilled_exactly(
    server: Server, databases: tuple[str, str], kafka: str, tmp_path: Path
):
    major = await server.major()
    pg_dump, pg_restore = _pg_tool("pg_dump", major), _pg_tool("pg_restore", major)
    live_url, restored_url = databases
    t = Topics.fresh(kafka)
    await create_topics(kafka, {t.source: 4, t.dlq: 1})
    records, calls = corpus(250, 0.02, seed=SEEDS[server.name])
    dump = tmp_path / "backup.dump"

    live = await asyncpg.create_pool(live_url, min_size=1, max_size=2)
    worker = WorkerProcess(worker_env(live_url, t), tmp_path / "live.log").start()
    try:
        publishing = asyncio.create_task(publish_slowly(t, records, chunks=40, pause_s=0.25))

        async def storing() -> bool:
            return sum((await stored_positions(live, t.group)).values()) > 0

        await eventually(storing, 60, "the worker to store its first batch")
        # The platform's backup, taken while the worker stores: dumps until one ran while
        # the stored positions moved (a dump of this small database takes a fraction of a
        # second, batches come every few hundred milliseconds).
        moved_during_dump = False
        for _ in range(30):
            before = sum((await stored_positions(live, t.group)).values())
            dbname = f"--dbname={live_url}"
            await _run(pg_dump, "--format=custom", "--no-password", dbname, f"--file={dump}")
            after = sum((await stored_positions(live, t.group)).values())
            if after > before:
                moved_during_dump = True
                break
            if publishing.done():
                break
        assert moved_during_dump, "no backup was taken while the worker stored events"
        pub = await publishing
        # The live database goes on to store everything, and Kafka's committed offsets
        # follow it: the restored worker must start from the backup's positions, not those.
        await drained(live, t, pub, timeout_s=120)
        worker.signal(15)
        assert await asyncio.to_thread(worker.wait, 40) == 0
    finally:
        worker.stop()
        await live.close()

    # The live database is lost; the backup goes into a new one.
    await server.restore(pg_restore, dump, restored_url)
    restored = await asyncpg.create_pool(restored_url, min_size=1, max_size=2)
    try:
        in_backup = await stored_positions(restored, t.group)
        assert 0 < sum(in_backup.values()) < sum(pub.ends.values()), (in_backup, pub.ends)
        behind = sum(pub.ends.values()) - sum(in_backup.values())

        worker = WorkerProcess(worker_env(restored_url, t), tmp_path / "restored.log").start()
        try:
            await drained(restored, t, pub, timeout_s=120)
            worker.signal(15)
            assert await asyncio.to_thread(worker.wait, 40) == 0
        finally:
            worker.stop()
        rec = await assert_reconciled(restored, t, pub, calls)
    finally:
        await restored.close()
    assert rec.dead_lettered > 0

    # Dead letters are published again for records re-read after the restore, and only
    # for those: every repeat lies at or past its partition's position in the backup.
    sent = collections.Counter(d.source for d in await read_topic(kafka, t.dlq))
    repeats = {coords: n for coords, n in sent.items() if n > 1}
    assert all(n == 2 for n in repeats.values()), repeats
    assert all(offset >= in_backup.get(p, 0) for p, offset in repeats), (repeats, in_backup)
    print(
        f"\n{server.name}: backup {sum(in_backup.values())} of {sum(pub.ends.values())} records "
        f"in; refilled {behind}; {rec.stored} stored, {rec.dead_lettered} dead-lettered, "
        f"{len(repeats)} dead letters published again"
    )
