"""A small TCP proxy in front of PostgreSQL that ends sessions at chosen points of the
batch transaction, the way a failover, an idle-session killer or an operator's
``pg_terminate_backend`` does, but at a moment the test picks instead of by luck.

It reads the frontend protocol (type byte, length, body) to see where a session is: at
``BEGIN``, at a statement inside the transaction, at ``COPY``, inside the COPY data, at
``COMMIT``, at the pool's reset query, or idle in the pool after it. The backend's pid
comes from its BackendKeyData. At a wanted point the proxy calls ``pg_terminate_backend`` on
that pid over its own connection, then lets the client's message go on to a session that is
gone (or, for the "during" points, terminates right after passing it on).

A session ended while idle in the pool gets the server's FATAL message at once but sees the
connection close only when it next speaks: the window in which asyncpg still takes the
connection for open and fails with ``InternalClientError`` ("cannot switch to state 15;
another operation (2) is in progress"), held open so that the test does not depend on luck.

Only plain (``sslmode=disable``) sessions can be read; a cancel request is passed through.

``FlowFreezer`` reads the same protocol to black-hole flows instead of ending sessions: at a
point of the batch transaction it stops forwarding in both directions and keeps both sockets
open, as a lost NAT or load-balancer entry does, so that neither side ever learns of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

# Where a session can be ended, in the order a batch reaches them.
BEGIN = "before BEGIN"
STATEMENT = "before a statement in the transaction"
COPY = "before COPY"
DURING_COPY = "during COPY"
BEFORE_COMMIT = "before COMMIT"
DURING_COMMIT = "during COMMIT"
RESET = "during the pool's reset"
IDLE = "idle in the pool"
POINTS = (BEGIN, STATEMENT, COPY, DURING_COPY, BEFORE_COMMIT, DURING_COMMIT, RESET, IDLE)
# Terminated after the message was passed on, so the server may be running it.
_AFTER = frozenset({DURING_COPY, DURING_COMMIT})

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102


@dataclass
class _Session:
    pid: int | None = None
    in_transaction: bool = False
    in_copy: bool = False
    answers_one_byte: bool = False
    resetting: bool = False
    held_open: bool = False
    server_gone: bool = False


class SessionTerminator:
    """Proxies ``upstream_url``'s server on a local port; ends sessions at ``wanted`` points
    (point -> how many times), one point at a time, with at least one committed transaction
    between two terminations so that the worker gets to make progress."""

    def __init__(self, upstream_url: str, wanted: dict[str, int]) -> None:
        unknown = set(wanted) - set(POINTS)
        if unknown:
            raise ValueError(f"unknown points: {sorted(unknown)}")
        self._upstream = urlsplit(upstream_url)
        self._admin_url = upstream_url
        self.wanted = dict(wanted)
        self.hits: Counter[str] = Counter()
        self._commits_since = 1
        self._server: asyncio.Server | None = None
        self._admin: asyncpg.Connection | None = None
        self._admin_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> SessionTerminator:
        self._admin = await asyncpg.connect(self._admin_url)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._admin is not None:
            await self._admin.close()

    def url(self) -> str:
        """The upstream URL, through the proxy, in plain text (the proxy reads the protocol)."""
        u = self._upstream
        netloc = f"{u.username}@127.0.0.1:{self.port}" if u.username else f"127.0.0.1:{self.port}"
        query = "&".join(q for q in [u.query, "sslmode=disable"] if q)
        return urlunsplit((u.scheme, netloc, u.path, query, ""))

    def done(self) -> bool:
        """True once every wanted termination happened."""
        return all(self.hits[p] >= n for p, n in self.wanted.items())

    # ------------------------------------------------------------------ the proxy

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            host, port = self._upstream.hostname or "127.0.0.1", self._upstream.port or 5432
            server_r, server_w = await asyncio.open_connection(host, port)
            session = _Session()
            to_client = asyncio.create_task(self._from_server(server_r, client_w, session))
            to_server = asyncio.create_task(self._from_client(client_r, server_w, session))
            # The server's side decides when the session is over: it relays the FATAL
            # message of a terminated backend before the client sees the end.
            done, _ = await asyncio.wait({to_client, to_server}, return_when="FIRST_COMPLETED")
            if to_server in done:
                server_w.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(to_client), 2)
            elif session.held_open:
                # The client learns that the session is gone only when it next speaks.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(to_server), 60)
            for t in (to_client, to_server):
                t.cancel()
            await asyncio.gather(to_client, to_server, return_exceptions=True)
            server_w.close()
        except OSError:
            pass
        finally:
            client_w.close()
            self._tasks.discard(task)

    async def _from_server(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: _Session
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            while True:
                if s.answers_one_byte:
                    s.answers_one_byte = False
                    w.write(await r.readexactly(1))
                    continue
                head = await r.readexactly(5)
                kind, length = head[:1], struct.unpack("!I", head[1:])[0]
                body = await r.readexactly(length - 4)
                if kind == b"K":
                    s.pid = struct.unpack("!I", body[:4])[0]
                elif kind == b"C" and body.startswith(b"COMMIT"):
                    self._commits_since += 1
                w.write(head + body)
                await w.drain()
                if kind == b"Z" and s.resetting:
                    s.resetting = False
                    if self._take(IDLE):
                        s.held_open = True
                        await self._terminate(s)
        s.server_gone = True

    async def _from_client(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, s: _Session
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            while True:  # start-up packets: no type byte
                head = await r.readexactly(8)
                length, code = struct.unpack("!II", head)
                packet = head + await r.readexactly(length - 8)
                if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                    s.answers_one_byte = True
                    w.write(packet)
                    await w.drain()
                    continue
                w.write(packet)
                await w.drain()
                if code == _CANCEL_REQUEST:
                    return
                break
            while True:
                head = await r.readexactly(5)
                kind, length = head[:1], struct.unpack("!I", head[1:])[0]
                message = head + await r.readexactly(length - 4)
                if s.held_open and s.server_gone:
                    return
                point = self._point(kind, message[5:], s)
                take = point is not None and self._take(point)
                if take and point not in _AFTER:
                    await self._terminate(s)
                w.write(message)
                await w.drain()
                if take and point in _AFTER:
                    await self._terminate(s)

    def _point(self, kind: bytes, body: bytes, s: _Session) -> str | None:
        if kind == b"Q":
            sql = body.rstrip(b"\x00").decode(errors="replace").lstrip().upper()
            if sql.startswith("BEGIN"):
                s.in_transaction = True
                return BEGIN
            if sql.startswith("COPY"):
                s.in_copy = True
                return COPY
            if sql.startswith(("COMMIT", "ROLLBACK")):
                s.in_transaction = s.in_copy = False
                if not sql.startswith("COMMIT"):
                    return None
                # One COMMIT message serves both points: before, then during.
                return (
                    BEFORE_COMMIT
                    if self.hits[BEFORE_COMMIT] <= self.hits[DURING_COMMIT]
                    else (DURING_COMMIT)
                )
            if "PG_ADVISORY_UNLOCK_ALL" in sql or "RESET ALL" in sql:
                s.resetting = True
                return RESET
            return None
        if kind == b"d" and s.in_copy:
            s.in_copy = False  # the first data message of the COPY only
            return DURING_COPY
        if kind == b"B" and s.in_transaction:
            return STATEMENT
        return None

    def _take(self, point: str) -> bool:
        if self._commits_since < 1 or self.hits[point] >= self.wanted.get(point, 0):
            return False
        self.hits[point] += 1
        self._commits_since = 0
        return True

    async def _terminate(self, s: _Session) -> None:
        assert self._admin is not None
        if s.pid is None:
            return
        async with self._admin_lock:
            # Waits (up to 5 s) until the backend is gone, as a real termination would be.
            await self._admin.fetchval("SELECT pg_terminate_backend($1, 5000)", s.pid)


# ------------------------------------------------------------------ black-holed flows

# Where a flow can be frozen, in the order a batch reaches them.
BETWEEN = "between transactions"
AFTER_LOCK = "after BEGIN and the positions lock"
FREEZE_DURING_COPY = "during COPY"
FREEZE_BEFORE_COMMIT = "before COMMIT"
FREEZE_POINTS = (BETWEEN, AFTER_LOCK, FREEZE_DURING_COPY, FREEZE_BEFORE_COMMIT)


@dataclass(eq=False)
class _Flow:
    """One proxied connection, as far as freezing it goes."""

    in_transaction: bool = False
    statements_in_transaction: int = 0
    in_copy: bool = False
    frozen: bool = False


class FlowFreezer:
    """Proxies ``upstream_url``'s server on a local port; once armed, black-holes the first
    flow that reaches ``point``, and with it every other flow open at that moment, the way a
    lost NAT or load-balancer entry or a hung pooler does: nothing more is forwarded either
    way, and both sockets stay open, so no FIN and no RST ever reaches the client or the
    server. Connections opened afterwards are served as usual.

    The first flow freezes at ``point`` of a batch transaction: before ``BEGIN`` (between
    transactions: the server holds nothing for it), at the statement after the first one
    in the transaction (the positions lock is held), after the first data message of a
    ``COPY``, or before ``COMMIT``. Only plain (``sslmode=disable``) sessions can be read.
    """

    def __init__(self, upstream_url: str, point: str) -> None:
        if point not in FREEZE_POINTS:
            raise ValueError(f"unknown point {point!r}")
        self._upstream = urlsplit(upstream_url)
        self.point = point
        self.armed = False
        # When (time.monotonic()) the flows froze, and how many.
        self.frozen_at: float | None = None
        self.frozen_flows = 0
        self._flows: set[_Flow] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._stopping = asyncio.Event()
        self.port = 0

    async def __aenter__(self) -> FlowFreezer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        # Only now do the frozen flows' sockets close, and with them every relay.
        self._stopping.set()
        for w in self._writers:
            w.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def url(self) -> str:
        """The upstream URL, through the proxy, in plain text (the proxy reads the protocol)."""
        u = self._upstream
        netloc = f"{u.username}@127.0.0.1:{self.port}" if u.username else f"127.0.0.1:{self.port}"
        query = "&".join(q for q in [u.query, "sslmode=disable"] if q)
        return urlunsplit((u.scheme, netloc, u.path, query, ""))

    def arm(self) -> None:
        """Freeze at the next flow that reaches the point."""
        self.armed = True

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(client_w)
        flow = _Flow()
        try:
            host, port = self._upstream.hostname or "127.0.0.1", self._upstream.port or 5432
            server_r, server_w = await asyncio.open_connection(host, port)
            self._writers.append(server_w)
            self._flows.add(flow)
            relays = {
                asyncio.create_task(self._relay_server(server_r, client_w, flow)),
                asyncio.create_task(self._relay_client(client_r, server_w, flow)),
            }
            # A frozen flow's relays never end: its sockets stay open until the proxy stops.
            _, pending = await asyncio.wait(relays, return_when="FIRST_COMPLETED")
            for t in pending:
                t.cancel()
            await asyncio.gather(*relays, return_exceptions=True)
            server_w.close()
            client_w.close()
        except OSError:
            client_w.close()
        finally:
            self._flows.discard(flow)
            self._tasks.discard(task)

    def _freeze(self, flow: _Flow) -> None:
        self.armed = False
        self.frozen_at = time.monotonic()
        for f in self._flows | {flow}:
            f.frozen = True
        self.frozen_flows = len(self._flows | {flow})

    async def _hold(self) -> None:
        """Forward nothing more, read nothing more, close nothing: until the proxy stops."""
        await self._stopping.wait()

    async def _relay_server(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, flow: _Flow
    ) -> None:
        with contextlib.suppress(OSError):
            while chunk := await r.read(65536):
                if flow.frozen:
                    break
                w.write(chunk)
                await w.drain()
        if flow.frozen:  # the server's FIN (or anything after it) goes nowhere
            await self._hold()

    async def _relay_client(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, flow: _Flow
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            while True:  # start-up packets: no type byte
                head = await r.readexactly(8)
                length, code = struct.unpack("!II", head)
                w.write(head + await r.readexactly(length - 8))
                await w.drain()
                if code == _CANCEL_REQUEST:
                    return
                if code not in (_SSL_REQUEST, _GSSENC_REQUEST):
                    break
            while True:
                head = await r.readexactly(5)
                kind, length = head[:1], struct.unpack("!I", head[1:])[0]
                message = head + await r.readexactly(length - 4)
                if flow.frozen:
                    break
                point = self._point(kind, message[5:], flow)
                if self.armed and point == self.point and point != FREEZE_DURING_COPY:
                    self._freeze(flow)
                    break
                w.write(message)
                await w.drain()
                if self.armed and point == self.point:
                    self._freeze(flow)
                    break
        if flow.frozen:  # the client's FIN or RST goes nowhere
            await self._hold()

    @staticmethod
    def _point(kind: bytes, body: bytes, flow: _Flow) -> str | None:
        if kind == b"Q":
            sql = body.rstrip(b"\x00").decode(errors="replace").lstrip().upper()
            if sql.startswith("BEGIN"):
                flow.in_transaction, flow.statements_in_transaction = True, 0
                return BETWEEN
            if sql.startswith("COPY"):
                flow.in_copy = True
            elif sql.startswith(("COMMIT", "ROLLBACK")):
                flow.in_transaction = False
                return FREEZE_BEFORE_COMMIT if sql.startswith("COMMIT") else None
            return None
        if kind == b"d" and flow.in_copy:
            flow.in_copy = False  # the first data message of the COPY only
            return FREEZE_DURING_COPY
        if kind == b"B" and flow.in_transaction:
            flow.statements_in_transaction += 1
            # The transaction's first statement locks the positions; this is the next one.
            if flow.statements_in_transaction == 2:
                return AFTER_LOCK
        return None
