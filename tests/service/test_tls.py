"""TLS for real, with a test CA. PostgreSQL: a server of the test's own with ``ssl = on``;
``verify-full`` connects and the worker stores events; a certificate from another CA, or
for another host name, is a standing fault with a clear message, not a busy retry loop.
Kafka: the same over SSL to the broker.

The Tansu broker of the tests takes ``--cert``/``--key`` but does not serve TLS (0.6.0:
the two options conflict, and ``--cert`` alone leaves the listener in plaintext), so the
Kafka tests put a TLS-terminating proxy of their own in front of it and make the broker
advertise the proxy: every byte the worker exchanges with the broker crosses TLS."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import glob
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.helpers import create_ssl_context

from ingest.pipeline.sessions import SessionLimits, open_pool
from ingest.service.settings import Settings
from ingest.tools.devbroker import TansuBroker, free_port
from tests.pki import SERVER_NAME, Pki, make_pki
from tests.support import (
    Published,
    Record,
    Topics,
    WorkerProcess,
    call_events,
    drained,
    http_get_blocking,
    migrate,
    publish,
    record,
    running_worker,
    worker_env,
)

DATABASE = "ingest_tls"


def _postgres_bindir() -> Path | None:
    # Debian's layout (postgresql-NN packages), newest first; PG_BINDIR overrides.
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(found[0]).parent if found else None


def _as_server_user(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    directory = Path(tempfile.mkdtemp(prefix="ingest-pki-"))
    try:
        yield make_pki(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[int]:
    """A PostgreSQL server of its own that accepts only TLS connections; yields its port."""
    bindir = _postgres_bindir()
    if bindir is None or shutil.which("openssl") is None:
        pytest.skip("needs PostgreSQL's server binaries (initdb, pg_ctl) and openssl")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root needs runuser to start PostgreSQL as 'postgres'")
    root = Path(tempfile.mkdtemp(prefix="ingest-tls-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    shutil.copy(pki.server_cert, root / "server.pem")
    shutil.copy(pki.server_key, root / "server.key")
    (root / "server.key").chmod(0o600)
    if os.geteuid() == 0:
        for path in (root, sockets, root / "server.pem", root / "server.key"):
            shutil.chown(path, "postgres", "postgres")
    port = free_port()
    run = lambda *cmd: subprocess.run(_as_server_user(list(cmd)), check=True, capture_output=True)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-N")
    (data / "pg_hba.conf").write_text(
        "local all all trust\nhostnossl all all all reject\nhostssl all all all trust\n"
    )
    options = (
        f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c ssl=on "
        f"-c ssl_cert_file={root / 'server.pem'} -c ssl_key_file={root / 'server.key'} "
        "-c fsync=off"
    )
    run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w",
        "start")  # fmt: skip
    try:
        yield port
    finally:
        subprocess.run(
            _as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def _url(host: str, port: int, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"postgresql://postgres@{host}:{port}/{DATABASE}" + (f"?{query}" if query else "")


@pytest.fixture(scope="module")
async def tls_database(tls_server: int, pki: Pki) -> str:
    """The worker's schema on the TLS server; returns a ``verify-full`` URL for it."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    admin = await asyncpg.connect(host=SERVER_NAME, port=tls_server, user="postgres",
                                  database="postgres", ssl=ctx)  # fmt: skip
    try:
        await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await admin.close()
    url = _url(SERVER_NAME, tls_server, sslmode="verify-full", sslrootcert=str(pki.ca))
    await migrate(url)
    return url


async def test_verify_full_connects_over_tls_and_the_worker_stores_events(
    tls_database: str, topics: Topics
) -> None:
    pub = await publish(topics.bootstrap, topics.source, [record(e) for e in
                        call_events(uuid.uuid4())])  # fmt: skip
    db = await asyncpg.create_pool(tls_database, min_size=1, max_size=2)
    try:
        async with running_worker(worker_env(tls_database, topics)):
            await drained(db, topics, pub)
            encrypted = await db.fetch(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                "WHERE a.application_name = 'ingest'"
            )
        stored = await db.fetchval(
            "SELECT count(*) FROM call_events WHERE id = ANY($1::uuid[])",
            [uuid.UUID(orjson.loads(v)["id"]) for _, _, (_, v) in pub.records],
        )
    finally:
        await db.close()
    assert encrypted
    assert all(r["ssl"] for r in encrypted)
    assert stored == len(pub.records)


async def test_a_worker_session_over_tls_keeps_alive_on_its_own_socket_too(
    tls_database: str,
) -> None:
    settings = Settings.from_env({"DATABASE_URL": tls_database, "DATABASE_POOL_MIN": "1"})
    pool = await open_pool(settings)
    try:
        async with pool.acquire() as conn:
            encrypted = await conn.fetchval(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            )
            sock = conn._transport.get_extra_info("socket")
            options = SessionLimits.of(settings).socket_options()
            on_socket = [(lvl, opt, sock.getsockopt(lvl, opt)) for lvl, opt, _ in options]
    finally:
        await pool.close()
    assert encrypted
    assert on_socket == options


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize(
    "case",
    ["certificate from another CA", "certificate for another host name"],
)
def test_a_certificate_that_does_not_verify_is_a_standing_fault(
    tls_database: str, tls_server: int, pki: Pki, topics: Topics, tmp_path: Path, case: str
) -> None:
    if case == "certificate from another CA":
        # The explicit settings path (DATABASE_SSL_*), trusting an unrelated CA.
        extra = {
            "DATABASE_URL": _url(SERVER_NAME, tls_server),
            "DATABASE_SSL_MODE": "verify-full",
            "DATABASE_SSL_ROOT_CERT": str(pki.other_ca),
        }
        why = "unable to get local issuer certificate"
    else:
        # The URL path: the right CA, but the certificate names localhost, not 127.0.0.1.
        extra = {
            "DATABASE_URL": _url(
                "127.0.0.1", tls_server, sslmode="verify-full", sslrootcert=str(pki.ca)
            ),
        }
        why = "IP address mismatch"
    port = free_port()
    env = worker_env(tls_database, topics, INGEST_HTTP_PORT=str(port), **extra)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:

        def standing() -> bool:
            try:
                status, body = http_get_blocking(port, "/readyz")
            except OSError:
                return False
            return status == 503 and "standing fault: SSLCertVerificationError" in body

        deadline = time.monotonic() + 20
        while not standing():
            assert time.monotonic() < deadline, worker.log()[-2000:]
            time.sleep(0.2)
        time.sleep(4)  # a busy loop (backoff capped at 1 s here) would retry 3+ times
        assert worker.alive()
        _, metrics = http_get_blocking(port, "/metrics")
        log = worker.log()
    finally:
        worker.stop()
    errors = [line for line in log.splitlines() if "standing fault" in line]
    assert len(errors) == 1, log[-3000:]
    assert why in errors[0]
    assert "sslrootcert / DATABASE_SSL_ROOT_CERT" in errors[0]
    assert "transient failure" not in log
    # The try at start and at most one slow retry (>= 5 s later) in the ~4 s watched.
    assert 1 <= _metric(metrics, 'ingest_retries_total{target="database"}') <= 2


# ------------------------------------------------------------------------------ Kafka


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _forward(
    broker_port: int, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
) -> None:
    try:
        broker_r, broker_w = await asyncio.open_connection("127.0.0.1", broker_port)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(_pipe(client_r, broker_w), _pipe(broker_r, client_w))


@pytest.fixture(scope="module")
async def tls_bootstrap(pki: Pki) -> AsyncIterator[str]:
    """A broker reachable only through TLS, under the certificate's name."""
    proxy_port = free_port()
    address = f"{SERVER_NAME}:{proxy_port}"
    broker = TansuBroker(advertised=address)
    broker.start()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    server = await asyncio.start_server(
        functools.partial(_forward, broker.port), "127.0.0.1", proxy_port, ssl=ctx
    )
    try:
        yield address
    finally:
        server.close()
        broker.stop()


def _tls_options(pki: Pki) -> dict[str, Any]:
    return {"security_protocol": "SSL", "ssl_context": create_ssl_context(cafile=str(pki.ca))}


async def _tls_topics(bootstrap: str, pki: Pki) -> Topics:
    t = Topics.fresh(bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **_tls_options(pki))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t.source, 2, 1), NewTopic(t.dlq, 1, 1)])
    finally:
        await admin.close()
    return t


async def _publish_tls(bootstrap: str, pki: Pki, topic: str, records: list[Record]) -> Published:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, **_tls_options(pki)
    )
    await producer.start()
    try:
        metas = await asyncio.gather(*[await producer.send(topic, v, k) for k, v in records])
    finally:
        await producer.stop()
    return Published.acknowledged(records, metas)


async def test_the_worker_consumes_over_tls_from_a_broker_it_verifies(
    tls_bootstrap: str, pki: Pki, database_url: str, db: asyncpg.Pool
) -> None:
    t = await _tls_topics(tls_bootstrap, pki)
    records = [record(e) for e in call_events(uuid.uuid4())]
    pub = await _publish_tls(tls_bootstrap, pki, t.source, records)
    env = worker_env(database_url, t, KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CA_FILE=str(pki.ca))
    async with running_worker(env):
        await drained(db, t, pub)
    ids = [uuid.UUID(orjson.loads(v)["id"]) for _, _, (_, v) in pub.records]
    stored = await db.fetchval("SELECT count(*) FROM call_events WHERE id = ANY($1::uuid[])", ids)
    assert stored == len(records)


async def test_a_broker_certificate_from_another_ca_is_a_standing_fault(
    tls_bootstrap: str, pki: Pki, database_url: str, tmp_path: Path
) -> None:
    t = await _tls_topics(tls_bootstrap, pki)
    port = free_port()
    env = worker_env(
        database_url,
        t,
        KAFKA_SECURITY_PROTOCOL="SSL",
        KAFKA_SSL_CA_FILE=str(pki.other_ca),
        INGEST_HTTP_PORT=str(port),
    )
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                status, body = await asyncio.to_thread(http_get_blocking, port, "/readyz")
                if status == 503 and "standing fault: SSLCertVerificationError" in body:
                    break
            assert time.monotonic() < deadline, worker.log()[-2000:]
            await asyncio.sleep(0.2)
        await asyncio.sleep(4)  # a busy loop (backoff capped at 1 s here) would retry 3+ times
        assert worker.alive()
        _, metrics = await asyncio.to_thread(http_get_blocking, port, "/metrics")
        log = worker.log()
    finally:
        worker.stop()
    errors = [line for line in log.splitlines() if "standing fault" in line]
    assert len(errors) == 1, log[-3000:]
    assert '"target":"kafka"' in errors[0]
    assert "unable to get local issuer certificate" in errors[0]
    assert "KAFKA_SSL_CA_FILE" in errors[0]
    assert 1 <= _metric(metrics, 'ingest_retries_total{target="kafka"}') <= 2
