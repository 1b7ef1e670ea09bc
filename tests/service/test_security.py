"""Secrets stay out of logs, metrics and errors; the worker runs with least privilege."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from ingest.service.security import kafka_options, postgres_ssl
from ingest.service.settings import ConfigError, Settings
from ingest.tools.devbroker import free_port
from ingest.tools.migrate import Migrator, discover
from tests.conftest import TEST_DATABASE_URL, _with_db
from tests.support import (
    WorkerProcess,
    call_events,
    consumed,
    drained,
    http_get_blocking,
    one_connection_writer,
    publish,
    record,
    worker_env,
)

DB_SECRET = "pg-s3cret-Zq9"
SASL_SECRET = "sasl-s3cret-Xw7"


def _as_user(url: str, user: str, password: str | None = None) -> str:
    p = urlsplit(url)
    host = p.hostname or "127.0.0.1"
    auth = user if password is None else f"{user}:{password}"
    return urlunsplit((p.scheme, f"{auth}@{host}:{p.port or 5432}", p.path, p.query, ""))


def test_secrets_never_reach_logs_metrics_or_errors(tmp_path: Path) -> None:
    port = free_port()
    pw_file = tmp_path / "sasl"
    pw_file.write_text(SASL_SECRET)
    env = {
        **os.environ,
        # Nothing listens on port 1: the worker keeps failing to connect and says so.
        "DATABASE_URL": f"postgresql://ingest:{DB_SECRET}@127.0.0.1:1/voiceai",
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "ingest",
        "KAFKA_SASL_PASSWORD_FILE": str(pw_file),
        "INGEST_HTTP_PORT": str(port),
        "LOG_LEVEL": "debug",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        metrics = ""
        for _ in range(50):
            try:
                metrics = http_get_blocking(port, "/metrics")[1]
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(2.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = (out + err).decode()
    assert "cannot" in logs or "failure" in logs or "retrying" in logs  # it did log the failure
    assert "postgresql://ingest:***@127.0.0.1:1/voiceai" in logs
    for secret in (DB_SECRET, SASL_SECRET):
        assert secret not in logs
        assert secret not in metrics
    migrate = subprocess.run(
        [sys.executable, "-m", "ingest", "migrate", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrate.returncode != 0
    assert DB_SECRET not in migrate.stdout + migrate.stderr
    assert "***" in migrate.stderr


def test_settings_repr_hides_every_secret() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": f"postgresql://u:{DB_SECRET}@h/db",
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_USERNAME": "u",
            "KAFKA_SASL_PASSWORD": SASL_SECRET,
            "INGEST_READONLY_PASSWORD": "ro-secret",
        }
    )
    text = repr(s)
    assert DB_SECRET not in text
    assert SASL_SECRET not in text
    assert "ro-secret" not in text


def test_sasl_needs_a_username_and_a_password() -> None:
    with pytest.raises(ConfigError, match="KAFKA_SASL_USERNAME"):
        Settings.from_env(
            {"DATABASE_URL": "postgresql://h/db", "KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}
        )


def test_sasl_ssl_options_reach_the_kafka_clients() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://h/db",
            "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "KAFKA_SASL_MECHANISM": "scram-sha-256",
            "KAFKA_SASL_USERNAME": "u",
            "KAFKA_SASL_PASSWORD": "p",
        }
    )
    opts = kafka_options(s)
    assert opts["security_protocol"] == "SASL_SSL"
    assert opts["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("u", "p")
    assert opts["ssl_context"] is not None


def test_a_missing_ca_file_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="KAFKA_SSL_CA_FILE"):
        Settings.from_env(
            {"DATABASE_URL": "postgresql://h/db", "KAFKA_SSL_CA_FILE": "/nonexistent/ca.pem"}
        )


def test_database_ssl_mode_require_encrypts_without_verifying() -> None:
    s = Settings.from_env({"DATABASE_URL": "postgresql://h/db", "DATABASE_SSL_MODE": "require"})
    ctx = postgres_ssl(s)
    assert ctx is not None
    assert ctx.check_hostname is False
    assert postgres_ssl(Settings.from_env({"DATABASE_URL": "postgresql://h/db"})) is None


async def test_the_worker_needs_no_more_than_ingest_writer(
    database_url, db, topics, tmp_path: Path
) -> None:
    role = f"ingest_w_{uuid.uuid4().hex[:8]}"
    await db.execute(f'CREATE ROLE "{role}" LOGIN IN ROLE ingest_writer')
    try:
        url = _as_user(database_url, role)
        cid = uuid.uuid4()
        pub = await publish(topics.bootstrap, topics.source, [record(e) for e in call_events(cid)])
        worker = WorkerProcess(worker_env(url, topics), tmp_path / "w.log").start()
        try:
            await drained(db, topics, pub)
        finally:
            worker.stop()
        assert await db.fetchval("SELECT status FROM calls WHERE id = $1", cid) == "completed"
        conn = await asyncpg.connect(url)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DELETE FROM calls WHERE id = $1", cid)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("UPDATE agents SET name = 'x'")
        finally:
            await conn.close()
    finally:
        await db.execute(f'DROP OWNED BY "{role}"')
        await db.execute(f'DROP ROLE "{role}"')


async def test_a_member_of_ingest_writer_stores_stored_repeats_where_public_has_no_temporary(
    database_url, db, topics
) -> None:
    # A batch holding events stored before goes through a temporary table: hardened
    # clusters revoke TEMPORARY from PUBLIC, and the worker's role must still have it.
    role = f"ingest_w_{uuid.uuid4().hex[:8]}"
    database = urlsplit(database_url).path.lstrip("/")
    await db.execute(f'CREATE ROLE "{role}" LOGIN IN ROLE ingest_writer')
    await db.execute(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
    offsets = itertools.count()

    try:
        evs = call_events(uuid.uuid4())
        async with one_connection_writer(
            _as_user(database_url, role), topics, dedup_window=None
        ) as writer:
            await writer.write(consumed(topics.source, 0, offsets, evs[:2]))
            result = await writer.write(consumed(topics.source, 0, offsets, evs[1:]))
        assert (len(result.written), result.duplicates, result.dead_letters) == (3, 1, [])
    finally:
        await db.execute(f'GRANT TEMPORARY ON DATABASE "{database}" TO PUBLIC')
        await db.execute(f'DROP OWNED BY "{role}"')
        await db.execute(f'DROP ROLE "{role}"')


async def test_the_readonly_role_logs_in_only_with_a_configured_password() -> None:
    name = f"ingest_ro_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(TEST_DATABASE_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(_with_db(TEST_DATABASE_URL, name))
        try:
            await Migrator(conn, discover(), readonly_password="from-config").up()
            can_login = await conn.fetchval(
                "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'readonly_user'"
            )
            assert can_login is True
            ro = await asyncpg.connect(
                _as_user(_with_db(TEST_DATABASE_URL, name), "readonly_user", "from-config")
            )
            try:
                assert await ro.fetchval("SELECT count(*) FROM calls") == 0
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await ro.execute("DELETE FROM calls")
            finally:
                await ro.close()
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
