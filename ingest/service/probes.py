"""HTTP endpoints for Prometheus and Kubernetes: ``/metrics``, ``/healthz``, ``/readyz``
(and ``POST /breaker/reset`` for operators).

Written on asyncio's streams instead of pulling in an HTTP framework: three GET routes,
no bodies to parse, and it runs on the worker's own event loop, so ``/healthz`` proves that
loop is alive. Liveness never depends on PostgreSQL or Kafka (a blip would restart every
pod); readiness does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class Health:
    """What the probes report; the worker updates it, the HTTP server reads it."""

    def __init__(self, stall_after_s: float = 60.0) -> None:
        self.loop_beat = time.monotonic()
        self.stall_after_s = stall_after_s
        self.database_ok = False
        self.group_joined = False
        self.breaker_open: str | None = None
        self.positions_mismatch: str | None = None
        # Partitions stopped at a record batch that cannot be decoded, one line each.
        self.stalled: list[str] = []
        self.not_ready_because: str | None = "starting"

    def beat(self) -> None:
        """The worker loop is alive (called every iteration)."""
        self.loop_beat = time.monotonic()

    def alive(self) -> bool:
        """The worker loop turned recently."""
        return time.monotonic() - self.loop_beat < self.stall_after_s

    def ready(self) -> tuple[bool, str]:
        """Ready when the database answers, the group is joined and nothing stops consumption."""
        if not self.database_ok:
            # Say why when it is known (e.g. a standing fault: the certificate does not verify).
            why = self.not_ready_because
            return False, "database unreachable" + (f": {why}" if why and why != "starting" else "")
        if self.breaker_open is not None:
            return False, f"dead-letter breaker open: {self.breaker_open}"
        if self.positions_mismatch is not None:
            return False, self.positions_mismatch
        if self.not_ready_because not in (None, "starting"):
            # Before the group check: a broker the worker cannot reach is why it has not joined.
            return False, str(self.not_ready_because)
        if not self.group_joined:
            return False, "consumer has not joined its group"
        if self.stalled:
            return False, "partition stalled, undecodable record batch: " + "; ".join(self.stalled)
        if self.not_ready_because is not None:
            return False, self.not_ready_because
        return True, "ready"


class ProbeServer:
    """Serves the three endpoints on ``port`` (0 picks a free one; see ``port`` after start)."""

    def __init__(
        self,
        health: Health,
        port: int,
        on_ready: Callable[[bool], None] | None = None,
        actions: dict[str, Callable[[], str]] | None = None,
    ):
        self._health = health
        self._port = port
        self._server: asyncio.Server | None = None
        self._on_ready = on_ready
        self._actions = actions or {}

    @property
    def port(self) -> int:
        """The port actually bound."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and start serving."""
        self._server = await asyncio.start_server(self._handle, "0.0.0.0", self._port)

    async def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            status, ctype, body = self._route(method, path)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        if method == "POST" and path in self._actions:
            return 200, text, f"{self._actions[path]()}\n".encode()
        if method not in ("GET", "HEAD"):
            return 405, text, b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        if path == "/healthz":
            ok = self._health.alive()
            return (200 if ok else 503), text, (b"ok\n" if ok else b"worker loop stalled\n")
        if path == "/readyz":
            ok, why = self._health.ready()
            if self._on_ready is not None:
                self._on_ready(ok)
            return (200 if ok else 503), text, f"{why}\n".encode()
        return 404, text, b"not found\n"
