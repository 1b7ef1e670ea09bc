"""Black-holed Kafka connections: a lost NAT or load-balancer entry, a hung middlebox. No RST
and no FIN ever reach the worker or the broker; the connections simply carry nothing more,
while new connections get through.

The test broker advertises a proxy (``tests/faults/tcpfreeze.py``) as its address, so every
flow of the worker passes through it: the bootstrap, the fetch connection to the partition
leader, the group coordinator's (heartbeats, commits, joins) and the dead-letter producer's.
A third of the corpus in, once the worker's connections have carried a fetch, a heartbeat
and a dead letter, the proxy freezes every flow open at that moment; the rest of the corpus
is published over new connections while the worker is blind. The worker must notice by its
own timeouts, drop the dead connections, open new ones and go on, with nothing lost and
nothing stored twice, on its default Kafka settings. Measured: from the freeze to the first
stored record that was published after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.group import HeartbeatRequest
from aiokafka.protocol.produce import ProduceRequest

from ingest.tools.devbroker import TansuBroker, free_port
from tests.faults.harness import assert_reconciled, corpus, publish_slowly
from tests.faults.tcpfreeze import Flow, FreezingProxy
from tests.kafka_wire import RequestKeys
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

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(
        not Path("/proc/self/fd").is_dir(),
        reason="tells the worker's connections from the test's own by /proc (Linux)",
    ),
]

# The target for a frozen broker connection, with the default settings.
RESUME_WITHIN_S = 30.0
FETCH, HEARTBEAT, PRODUCE = FetchRequest.API_KEY, HeartbeatRequest.API_KEY, ProduceRequest.API_KEY


@pytest_asyncio.fixture(loop_scope="session")
async def proxied_broker() -> AsyncIterator[FreezingProxy]:
    """A broker of this test's own that advertises a freezing proxy in front of it."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip(
            "needs a broker of its own that advertises the freezing proxy as its address; "
            "KAFKA_BOOTSTRAP_SERVERS names an external one"
        )
    broker_port = free_port()
    broker: TansuBroker | None = None
    try:
        async with FreezingProxy("127.0.0.1", broker_port, watch=RequestKeys) as proxy:
            broker = TansuBroker(port=broker_port, advertised=proxy.address)
            await asyncio.to_thread(broker.start)
            yield proxy
    finally:
        # Stopped after the proxy has closed the frozen connections: with them open, Tansu
        # did not end on SIGTERM and was killed after the 5 s its stop allows.
        if broker is not None:
            await asyncio.to_thread(broker.stop)


def _local_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process ``pid`` has open (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as lines:
            next(lines)  # the header
            for line in lines:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _flows_of(worker: WorkerProcess, proxy: FreezingProxy) -> list[Flow]:
    """The proxy's open flows whose client is the worker (not the test's own clients)."""
    ports = _local_ports(worker.pid)
    return [f for f in proxy.open_flows() if f.client_port in ports]


def _requests(flows: list[Flow]) -> set[int]:
    """The API keys of every request these flows carried."""
    keys: set[int] = set()
    for flow in flows:
        assert isinstance(flow.watcher, RequestKeys)
        keys |= flow.watcher.seen
    return keys


async def _first_stored_beyond(
    db: asyncpg.Pool, t: Topics, ends: dict[int, int], timeout_s: float
) -> float:
    """Wait until a partition's stored position passes its published end at the freeze: a
    record that did not exist then was fetched and stored, over a new connection. The time."""

    async def beyond() -> bool:
        stored = await stored_positions(db, t.group)
        return any(pos > ends.get(p, 0) for p, pos in stored.items())

    await eventually(beyond, timeout_s, "a record published after the freeze to be stored")
    return time.monotonic()


async def test_frozen_kafka_connections_are_replaced_and_consuming_resumes_within_30s(
    database_url: str, db: asyncpg.Pool, proxied_broker: FreezingProxy, tmp_path: Path
) -> None:
    proxy = proxied_broker
    t = Topics.fresh(proxy.address)
    await create_topics(t.bootstrap, {t.source: 4, t.dlq: 1})
    records, calls = corpus(300, 0.03, seed=63)
    env = worker_env(database_url, t)
    # Every Kafka client setting at its default: worker_env shortens the session for quick
    # joins, and the session is what a frozen coordinator connection puts at stake.
    del env["KAFKA_SESSION_TIMEOUT_MS"], env["KAFKA_HEARTBEAT_INTERVAL_MS"]
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        third = len(records) // 3
        pub = await publish(t.bootstrap, t.source, records[:third])

        # Freeze once the worker's connections have carried a fetch, a heartbeat and a
        # dead letter: then its fetch, coordinator and producer connections are all open.
        async def worker_flows_busy() -> bool:
            return _requests(_flows_of(worker, proxy)) >= {FETCH, HEARTBEAT, PRODUCE}

        await eventually(
            worker_flows_busy,
            60,
            "the worker's fetch, coordinator and dead-letter producer connections",
        )
        workers_flows = _flows_of(worker, proxy)
        frozen = proxy.freeze()
        frozen_at = time.monotonic()
        ends = dict(pub.ends)
        # The rest comes in over new connections, which the proxy serves.
        rest = await publish_slowly(t, records[third:], chunks=10, pause_s=0.5)
        resumed_at = await _first_stored_beyond(db, t, ends, timeout_s=120)
        pub.extend(rest)
        await drained(db, t, pub, timeout_s=120)
        assert worker.alive(), "a frozen broker connection must not end the worker"
    finally:
        worker.stop()
    assert set(workers_flows) <= set(frozen)
    assert _requests(workers_flows) >= {FETCH, HEARTBEAT, PRODUCE}
    resumed_s = resumed_at - frozen_at
    print(
        f"{len(workers_flows)} of the worker's flows frozen; "
        f"consuming resumed {resumed_s:.1f} s after the freeze"
    )
    assert resumed_s < RESUME_WITHIN_S
    await assert_reconciled(db, t, pub, calls)
    assert "Traceback" not in worker.log()
