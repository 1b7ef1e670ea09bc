"""The worker's PostgreSQL sessions: opened with limits, so that a session whose client or
network vanished cannot hold the pipeline, and ended from outside when one is lost.

A flow can vanish without a word: a NAT or load-balancer entry lost, a hung pooler. No RST
and no FIN reaches either side, so the client waits for an answer that never comes, and
the server keeps the session, with every row lock of its open transaction, until something
ends it. PostgreSQL's own keepalive default is two hours. So every session of the worker
carries:

- ``statement_timeout`` and ``idle_in_transaction_session_timeout`` equal to the write
  timeout: no statement, and no transaction waiting for its client, outlives the batch the
  worker has already given up on (the server ends an idle transaction with its locks);
- ``lock_timeout``: waiting for the positions lock is transient (55P03), and retried;
- TCP keepalives and ``tcp_user_timeout``, on the server's socket (as session settings) and
  on the client's (as socket options; asyncpg has none of its own), so that either end
  finds a dead peer in about a minute, also when the session is in the middle of a COPY,
  where neither timeout above applies.

Those are the backstops for a worker that vanished itself. A live worker does better: when
an exchange runs past its time limit, it ends the server process of that session from
another connection (``end_session``), and the locks go at once.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from ingest.service import security
from ingest.service.settings import Settings

# How the worker's sessions show in pg_stat_activity.
APPLICATION_NAME = "ingest"

# Ends the server process of a session of this worker's application (not a pid the server
# may have given to another session since), and waits up to $3 ms until it is gone.
_END_SESSION = """
SELECT pg_terminate_backend(pid, $3)
FROM pg_stat_activity
WHERE pid = $1 AND application_name = $2
"""


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What every worker session is told, by the server and by its own socket."""

    statement_timeout_ms: int
    idle_in_transaction_timeout_ms: int
    lock_timeout_ms: int
    keepalives_idle_s: int
    keepalives_interval_s: int
    keepalives_count: int
    tcp_user_timeout_ms: int

    @classmethod
    def of(cls, settings: Settings) -> SessionLimits:
        """The limits that follow from the configuration."""
        write_ms = round(settings.write_timeout_s * 1000)
        return cls(
            statement_timeout_ms=write_ms,
            idle_in_transaction_timeout_ms=write_ms,
            lock_timeout_ms=settings.database_lock_timeout_ms or write_ms // 2,
            keepalives_idle_s=settings.database_keepalives_idle_s,
            keepalives_interval_s=settings.database_keepalives_interval_s,
            keepalives_count=settings.database_keepalives_count,
            tcp_user_timeout_ms=settings.database_tcp_user_timeout_ms,
        )

    def server_settings(self) -> dict[str, str]:
        """Session settings, sent in the start-up packet: they are the session's defaults,
        so the pool's ``RESET ALL`` on every release keeps them."""
        return {
            "application_name": APPLICATION_NAME,
            "statement_timeout": str(self.statement_timeout_ms),
            "idle_in_transaction_session_timeout": str(self.idle_in_transaction_timeout_ms),
            "lock_timeout": str(self.lock_timeout_ms),
            "tcp_keepalives_idle": str(self.keepalives_idle_s),
            "tcp_keepalives_interval": str(self.keepalives_interval_s),
            "tcp_keepalives_count": str(self.keepalives_count),
            "tcp_user_timeout": str(self.tcp_user_timeout_ms),
            # The writer's statements are small; a misestimate (the look-back's key-range
            # probe, ``sink._RECENT_IDS_BY_KEY``) made the server compile each batch's plan.
            "jit": "off",
        }

    def socket_options(self) -> list[tuple[int, int, int]]:
        """The client socket's options as ``(level, option, value)``; those the platform
        lacks are left out (``TCP_USER_TIMEOUT`` is Linux only)."""
        wanted = [
            (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
            (socket.IPPROTO_TCP, "TCP_KEEPIDLE", self.keepalives_idle_s),
            (socket.IPPROTO_TCP, "TCP_KEEPINTVL", self.keepalives_interval_s),
            (socket.IPPROTO_TCP, "TCP_KEEPCNT", self.keepalives_count),
            (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", self.tcp_user_timeout_ms),
        ]
        return [
            (level, getattr(socket, name), value)
            for level, name, value in wanted
            if hasattr(socket, name)
        ]


async def keep_alive(limits: SessionLimits, conn: asyncpg.Connection) -> None:
    """Set the keepalive and user-timeout options on a new connection's TCP socket.

    asyncpg takes no such option (MagicStack/asyncpg#606), so the pool's ``init`` hook sets
    them on the transport's socket (under TLS too: the transport hands out the socket
    beneath). A Unix-domain socket has no TCP to tune.
    """
    sock = conn._transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    for level, option, value in limits.socket_options():
        sock.setsockopt(level, option, value)


# PostgreSQL's epoch, and its infinities as asyncpg decodes them (int64 bounds on the wire).
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_INFINITY_US = 2**63 - 1
_MINUS_INFINITY_US = -(2**63)


def timestamptz_to_wire(value: datetime) -> tuple[int]:
    """An aware datetime as asyncpg's tuple form of ``timestamptz``: microseconds since
    2000-01-01 UTC. A naive one raises ``TypeError`` (asyncpg's own encoder would take it
    as the client's local time)."""
    return ((value - _PG_EPOCH) // _MICROSECOND,)


def timestamptz_from_wire(value: tuple[int]) -> datetime:
    """The inverse of ``timestamptz_to_wire``: an aware datetime in UTC, the infinities as
    asyncpg's own decoder gives them (the naive ``datetime.max`` and ``datetime.min``)."""
    us = value[0]
    if us == _INFINITY_US:
        return datetime.max
    if us == _MINUS_INFINITY_US:
        return datetime.min
    return _PG_EPOCH + timedelta(microseconds=us)


async def prepare_session(limits: SessionLimits, conn: asyncpg.Connection) -> None:
    """The pool's ``init`` of each new connection: the socket's keepalives (``keep_alive``)
    and the worker's own ``timestamptz`` codec.

    asyncpg's binary encoder of ``timestamptz`` compares every value with its two infinity
    datetimes (naive ones: each comparison with an aware value costs about 200 ns) before
    converting it: about 850 ns per value, most of a COPY row's client work (a row of the
    five call_events columns: 1,390-1,430 ns; one uuid 154, text 115, jsonb 199). Through
    its tuple form, with the conversion above, the same row took 860-960 ns. Values and
    results stay datetimes; only the wire conversion is this module's."""
    await keep_alive(limits, conn)
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=timestamptz_to_wire,
        decoder=timestamptz_from_wire,
        format="tuple",
    )


async def open_pool(settings: Settings) -> asyncpg.Pool:
    """The worker's connection pool, every session opened with ``SessionLimits``."""
    limits = SessionLimits.of(settings)
    return await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.database_pool_min,
        max_size=settings.database_pool_max,
        max_inactive_connection_lifetime=settings.database_idle_timeout_ms / 1000,
        timeout=settings.database_connection_timeout_ms / 1000,
        server_settings=limits.server_settings(),
        init=functools.partial(prepare_session, limits),
        # asyncpg's bound of each statement, and of its own cancel request after one.
        command_timeout=settings.write_timeout_s,
        ssl=security.postgres_ssl(settings),
    )


async def end_session(conn: asyncpg.Connection, pid: int, wait_s: float) -> bool | None:
    """Over ``conn``, end the worker's session with server process ``pid`` and wait up to
    ``wait_s`` until it is gone, with its locks. True: ended; False: it did not end in
    time; None: no such session of the worker (it ended already)."""
    ended: bool | None = await conn.fetchval(
        _END_SESSION, pid, APPLICATION_NAME, max(1, round(wait_s * 1000))
    )
    return ended
