"""Error policy: what each failure means, and how long to wait before trying again."""

from __future__ import annotations

import asyncio
import random
import ssl

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError, KafkaError
from asyncpg import exceptions as pg

from ingest.pipeline.policy import (
    Backoff,
    Disposition,
    classify,
    is_retryable,
    session_may_linger,
    sqlstate_class,
    sqlstate_of,
)
from ingest.pipeline.sink import PositionsMovedBack, SessionTimedOut


@pytest.mark.parametrize(
    ("exc_type", "sqlstate"),
    [
        (pg.CheckViolationError, "23514"),
        (pg.ForeignKeyViolationError, "23503"),
        (pg.NotNullViolationError, "23502"),
        (pg.StringDataRightTruncationError, "22001"),
        (pg.NumericValueOutOfRangeError, "22003"),
        (pg.UntranslatableCharacterError, "22P05"),
    ],
)
def test_data_errors_are_data(exc_type: type[asyncpg.PostgresError], sqlstate: str) -> None:
    exc = exc_type("rejected")

    assert sqlstate_of(exc) == sqlstate
    assert classify(exc) is Disposition.DATA


def test_unique_violation_is_transient_not_data() -> None:
    exc = pg.UniqueViolationError("duplicate key")

    assert sqlstate_of(exc) == "23505"
    assert classify(exc) is Disposition.TRANSIENT


@pytest.mark.parametrize(
    "exc_type",
    [
        pg.SerializationError,  # 40001
        pg.DeadlockDetectedError,  # 40P01
        pg.AdminShutdownError,  # 57P01
        pg.QueryCanceledError,  # 57014
        pg.TooManyConnectionsError,  # 53300
        pg.LockNotAvailableError,  # 55P03
        pg.ConnectionDoesNotExistError,  # 08003
        pg.DiskFullError,  # 53100
    ],
)
def test_concurrency_resource_and_connection_errors_are_transient(
    exc_type: type[asyncpg.PostgresError],
) -> None:
    assert classify(exc_type("try again")) is Disposition.TRANSIENT


@pytest.mark.parametrize(
    "exc_type",
    [
        pg.UndefinedTableError,  # 42P01
        pg.UndefinedColumnError,  # 42703
        pg.InsufficientPrivilegeError,  # 42501
        pg.InvalidCatalogNameError,  # 3D000
        pg.InvalidPasswordError,  # 28P01
        pg.InvalidAuthorizationSpecificationError,  # 28000
        pg.FeatureNotSupportedError,  # 0A000
    ],
)
def test_setup_errors_are_standing(exc_type: type[asyncpg.PostgresError]) -> None:
    assert classify(exc_type("fix me")) is Disposition.STANDING


@pytest.mark.parametrize(
    ("exc_type", "sqlstate"),
    [
        (pg.LockNotAvailableError, "55P03"),  # lock_timeout
        (pg.QueryCanceledError, "57014"),  # statement_timeout
        (pg.IdleInTransactionSessionTimeoutError, "25P03"),  # the server ended an idle one
    ],
)
def test_what_the_session_limits_raise_is_transient_and_retryable(
    exc_type: type[asyncpg.PostgresError], sqlstate: str
) -> None:
    exc = exc_type("canceling statement due to a limit")

    assert sqlstate_of(exc) == sqlstate
    assert classify(exc) is Disposition.TRANSIENT
    assert is_retryable(exc)


def test_an_exchange_past_its_time_limit_is_transient_and_retryable() -> None:
    exc = SessionTimedOut("no answer from the database within 10 s; session ended")

    assert classify(exc) is Disposition.TRANSIENT
    assert is_retryable(exc)
    assert sqlstate_class(exc) == "connection"


@pytest.mark.parametrize(
    "exc",
    [
        SessionTimedOut("no answer"),
        TimeoutError(),
        asyncio.CancelledError(),
        ConnectionResetError(104, "Connection reset by peer"),
        OSError(110, "Connection timed out"),  # TCP_USER_TIMEOUT or keepalives
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.InternalClientError("cannot switch to state 15"),
        pg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    ],
)
def test_a_session_given_up_or_lost_by_the_client_may_linger_on_the_server(
    exc: BaseException,
) -> None:
    assert session_may_linger(exc)


@pytest.mark.parametrize(
    "exc",
    [
        pg.LockNotAvailableError("lock timeout"),
        pg.QueryCanceledError("statement timeout"),
        pg.AdminShutdownError("terminating connection due to administrator command"),
        pg.UniqueViolationError("duplicate key"),
        KafkaConnectionError("broker down"),
        PositionsMovedBack({("t", 0): 5}),
        ValueError("bug"),
    ],
)
def test_a_session_still_answering_after_the_failure_does_not_linger(exc: BaseException) -> None:
    assert not session_may_linger(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        OSError(113, "No route to host"),
        TimeoutError(),
        asyncpg.InterfaceError("connection is closed"),
        KafkaConnectionError("broker down"),
    ],
)
def test_network_and_broker_errors_are_transient(exc: BaseException) -> None:
    assert classify(exc) is Disposition.TRANSIENT


def test_sqlstate_of_ignores_non_postgres_errors() -> None:
    assert sqlstate_of(ValueError("x")) is None
    assert sqlstate_of(OSError("x")) is None


@pytest.mark.parametrize(
    ("exc", "label"),
    [
        (pg.CheckViolationError("x"), "23"),
        (pg.SerializationError("x"), "40"),
        (pg.UndefinedTableError("x"), "42"),
        (pg.InvalidCatalogNameError("x"), "3D"),
        (ConnectionRefusedError(), "connection"),
        (OSError(), "connection"),
        (TimeoutError(), "connection"),
        (asyncpg.InterfaceError("closed"), "connection"),
        (ValueError("bug"), "other"),
        (KafkaError(), "other"),
    ],
)
def test_sqlstate_class_labels(exc: BaseException, label: str) -> None:
    assert sqlstate_class(exc) == label


@pytest.mark.parametrize(
    "exc",
    [
        pg.CheckViolationError("x"),
        asyncpg.InterfaceError("x"),
        ConnectionRefusedError(),
        TimeoutError(),
        KafkaConnectionError(),
    ],
)
def test_database_network_and_broker_errors_are_retryable(exc: BaseException) -> None:
    assert is_retryable(exc)


@pytest.mark.parametrize("exc", [ValueError("x"), KeyError("x"), TypeError("x")])
def test_programming_errors_are_not_retryable(exc: BaseException) -> None:
    assert not is_retryable(exc)


# --- Backoff --------------------------------------------------------------------------------


class TopOfRange(random.Random):
    """Always picks the upper bound, exposing the ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


class BottomOfRange(random.Random):
    """Always picks the lower bound."""

    def uniform(self, a: float, b: float) -> float:
        return a


def test_backoff_ceiling_doubles_from_base() -> None:
    b = Backoff(base_s=0.1, cap_s=100.0, rng=TopOfRange())

    delays = [b.next_delay() for _ in range(5)]

    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])


def test_backoff_never_waits_less_than_half_the_ceiling() -> None:
    b = Backoff(base_s=0.1, cap_s=100.0, rng=BottomOfRange())

    delays = [b.next_delay() for _ in range(3)]

    assert delays == pytest.approx([0.05, 0.1, 0.2])


def test_backoff_delays_grow_with_jitter() -> None:
    b = Backoff(base_s=0.1, cap_s=10.0, rng=random.Random(7))

    delays = [b.next_delay() for _ in range(7)]

    assert delays == sorted(delays)
    assert delays[-1] > delays[0]
    for n, d in enumerate(delays):
        ceiling = min(10.0, 0.1 * 2**n)
        assert ceiling / 2 <= d <= ceiling


def test_backoff_stays_within_half_cap_and_cap_once_capped() -> None:
    b = Backoff(base_s=0.1, cap_s=10.0, rng=random.Random(11))
    for _ in range(8):  # 0.1 * 2**7 = 12.8 > cap
        b.next_delay()

    delays = [b.next_delay() for _ in range(200)]

    assert all(5.0 <= d <= 10.0 for d in delays)
    assert len(set(delays)) > 1  # still jittered


def test_backoff_survives_very_many_attempts() -> None:
    b = Backoff(base_s=0.1, cap_s=10.0, attempt=10_000, rng=TopOfRange())

    assert b.next_delay() == 10.0


def test_backoff_reset_starts_over() -> None:
    b = Backoff(base_s=0.1, cap_s=10.0, rng=TopOfRange())
    for _ in range(10):
        b.next_delay()

    b.reset()

    assert b.attempt == 0
    assert b.next_delay() == pytest.approx(0.1)


@pytest.mark.parametrize(
    "exc",
    [
        # What a session PostgreSQL ended looks like from asyncpg, besides a SQLSTATE.
        pg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
        pg.InterfaceError("cannot perform operation: connection is closed"),
        pg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_broken_or_ended_session_is_retried_as_transient(exc: BaseException) -> None:
    assert is_retryable(exc)
    assert classify(exc) is Disposition.TRANSIENT
    assert sqlstate_class(exc) in ("connection", "08")


@pytest.mark.parametrize(
    "message",
    [
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer",
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch",
    ],
)
def test_a_server_certificate_that_does_not_verify_is_standing(message: str) -> None:
    exc = ssl.SSLCertVerificationError(1, message)

    assert is_retryable(exc)
    assert classify(exc) is Disposition.STANDING


def test_other_tls_failures_stay_transient() -> None:
    assert classify(ssl.SSLError(1, "[SSL: UNEXPECTED_EOF_WHILE_READING]")) is Disposition.TRANSIENT
