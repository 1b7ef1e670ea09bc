"""Error policy, in one place: what a failure means and how long to wait before the next try.

PostgreSQL errors are judged by SQLSTATE class:
- ``DATA`` (22 data exception, 23 integrity violation): the batch is bisected and the
  offending records are dead-lettered as ``db_rejected``;
- ``TRANSIENT`` (08 connection, 25P03 idle-in-transaction timeout, 40 serialization/deadlock,
  53 resources, 55P03 lock not available (``lock_timeout``), 57 operator intervention
  (57014: ``statement_timeout``, a cancel), 58 system, timeouts, broker errors): the same
  batch is retried with capped exponential backoff and jitter;
- ``STANDING`` (42 undefined object / privilege, 3D database missing, 28 authentication,
  0A unsupported, 2B/3F), and a server certificate that does not verify (wrong CA, wrong
  host name): consumption pauses, readiness fails, retried slowly, logged once a minute;
  never dead-lettered because of it.
"""

from __future__ import annotations

import asyncio
import enum
import random
import ssl
from dataclasses import dataclass, field

import asyncpg
from aiokafka.errors import KafkaError

UNIQUE_VIOLATION = "23505"


class Disposition(enum.Enum):
    """What to do about a failure."""

    DATA = "data"
    TRANSIENT = "transient"
    STANDING = "standing"


# How a broken or ended session surfaces from asyncpg, besides a SQLSTATE (08xxx, 57P01):
# a socket error, a timeout, an InterfaceError ("connection is closed"), or an
# InternalClientError ("cannot switch to state 15; another operation is in progress") from
# a connection whose exchange was cut short. With the connection discarded, a retry on a
# fresh one cures each.
_CONNECTION_ERRORS = (
    OSError | asyncio.TimeoutError | asyncpg.InterfaceError | asyncpg.InternalClientError
)

_STANDING_CLASSES = frozenset({"42", "3D", "28", "0A", "2B", "3F", "0L", "0P", "44"})
_DATA_CLASSES = frozenset({"22", "23"})


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error, or None for anything else."""
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) and len(state) == 5 else None


def sqlstate_class(exc: BaseException) -> str:
    """A bounded label for metrics: the SQLSTATE class, or ``connection`` / ``other``."""
    state = sqlstate_of(exc)
    if state is not None:
        return state[:2]
    if isinstance(exc, _CONNECTION_ERRORS):
        return "connection"
    return "other"


def classify(exc: BaseException) -> Disposition:
    """Judge one failure of a database write or a broker call."""
    state = sqlstate_of(exc)
    if state is not None:
        # A concurrent writer created the same call between our calls lookup and our COPY
        # (possible only across partitions); the retry's lookup will see it committed.
        # (Events never raise it: their INSERT skips a stored key, ON CONFLICT DO NOTHING.)
        if state == UNIQUE_VIOLATION:
            return Disposition.TRANSIENT
        cls = state[:2]
        if cls in _DATA_CLASSES:
            return Disposition.DATA
        if cls in _STANDING_CLASSES:
            return Disposition.STANDING
        return Disposition.TRANSIENT
    if isinstance(
        exc, asyncpg.InvalidCatalogNameError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return Disposition.STANDING
    # An OSError, but no retry cures it: the CA file or the server's certificate must change.
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Disposition.STANDING
    return Disposition.TRANSIENT


def session_may_linger(exc: BaseException) -> bool:
    """Whether the server may still hold the session, with its open transaction's locks,
    after this failure: the client gave up (a timeout, a cancellation) or lost the
    connection without the server saying a word. An error the server reported has ended
    the transaction and released its locks; a connection error (class 08) is the client's
    own report of a lost connection, which the server may not share."""
    if isinstance(exc, asyncpg.PostgresError):
        return sqlstate_class(exc) == "08"
    return isinstance(exc, _CONNECTION_ERRORS | asyncio.CancelledError)


def is_retryable(exc: BaseException) -> bool:
    """Errors a retry may cure; anything else is a bug and is raised."""
    return isinstance(exc, asyncpg.PostgresError | KafkaError | _CONNECTION_ERRORS)


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with "equal jitter": half the delay fixed, half random."""

    base_s: float = 0.1
    cap_s: float = 10.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """The delay before the next try; grows with every call until ``reset``."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Start over after a success."""
        self.attempt = 0
