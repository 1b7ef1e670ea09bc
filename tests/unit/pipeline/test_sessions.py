"""What every worker session is told: limits tied to the write timeout, and keepalives on
both ends, so that a session whose client or network vanished cannot hold the pipeline."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta, timezone

import pytest

from ingest.pipeline.sessions import (
    APPLICATION_NAME,
    SessionLimits,
    timestamptz_from_wire,
    timestamptz_to_wire,
)
from ingest.service.settings import Settings


def limits(**env: str) -> SessionLimits:
    return SessionLimits.of(Settings.from_env({"DATABASE_URL": "postgresql://db/x", **env}))


def test_no_statement_and_no_idle_transaction_outlives_the_write_timeout() -> None:
    got = limits(INGEST_WRITE_TIMEOUT_S="7.5")

    assert got.statement_timeout_ms == 7_500
    assert got.idle_in_transaction_timeout_ms == 7_500


def test_the_lock_timeout_is_half_the_write_timeout_unless_set() -> None:
    assert limits(INGEST_WRITE_TIMEOUT_S="8").lock_timeout_ms == 4_000
    assert limits(DATABASE_LOCK_TIMEOUT="1500").lock_timeout_ms == 1_500


def test_the_server_is_told_every_limit_and_its_keepalives_at_start_up() -> None:
    got = limits(
        INGEST_WRITE_TIMEOUT_S="12",
        DATABASE_LOCK_TIMEOUT="3000",
        DATABASE_KEEPALIVES_IDLE="20",
        DATABASE_KEEPALIVES_INTERVAL="4",
        DATABASE_KEEPALIVES_COUNT="5",
        DATABASE_TCP_USER_TIMEOUT="40000",
    ).server_settings()

    assert got == {
        "application_name": APPLICATION_NAME,
        "statement_timeout": "12000",
        "idle_in_transaction_session_timeout": "12000",
        "lock_timeout": "3000",
        "tcp_keepalives_idle": "20",
        "tcp_keepalives_interval": "4",
        "tcp_keepalives_count": "5",
        "tcp_user_timeout": "40000",
        "jit": "off",
    }


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket options")
def test_the_client_socket_keeps_alive_with_the_same_timing() -> None:
    got = limits(
        DATABASE_KEEPALIVES_IDLE="20",
        DATABASE_KEEPALIVES_INTERVAL="4",
        DATABASE_KEEPALIVES_COUNT="5",
        DATABASE_TCP_USER_TIMEOUT="40000",
    ).socket_options()

    assert got == [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 20),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 4),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5),
        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 40_000),
    ]


def test_a_timestamp_goes_to_the_wire_as_microseconds_since_2000_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert timestamptz_to_wire(datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=UTC)) == (1,)
    assert timestamptz_to_wire(datetime(2000, 1, 1, 2, 0, tzinfo=plus_two)) == (0,)
    assert timestamptz_to_wire(datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)) == (-1,)


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 6, 1, 9, 0, 0, 123_456, tzinfo=UTC),
        datetime(2026, 6, 1, 11, 0, 0, 1, tzinfo=timezone(timedelta(hours=2))),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ],
)
def test_a_timestamp_comes_back_from_the_wire_as_the_same_instant_in_utc(value: datetime) -> None:
    back = timestamptz_from_wire(timestamptz_to_wire(value))
    assert back == value
    assert back.tzinfo is UTC


def test_a_naive_timestamp_is_refused_not_taken_as_local_time() -> None:
    with pytest.raises(TypeError):
        timestamptz_to_wire(datetime(2026, 6, 1, 9, 0))


def test_the_infinities_come_back_as_asyncpg_gives_them() -> None:
    assert timestamptz_from_wire((2**63 - 1,)) == datetime.max
    assert timestamptz_from_wire((-(2**63),)) == datetime.min
