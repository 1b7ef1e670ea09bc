"""Configuration: one typed object, read from the environment once at start.

Every variable is listed in the README. A wrong or missing value raises
``ConfigError`` naming the variable; the CLI prints that one line and exits 2.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SSL_MODES = ("disable", "require", "verify-ca", "verify-full")
KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# What a stored position below the broker's log start leads to: hold the partition until an
# operator accepts the loss (``ingest positions reset``), or skip to the earliest record.
RETENTION_GAP_ACTIONS = ("hold", "skip")
# Kafka's rule for group.instance.id (JoinGroupRequest.validateGroupInstanceId): what a
# Kubernetes pod name (a DNS subdomain) always satisfies.
_INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,249}")
# A static member's session timeout when KAFKA_SESSION_TIMEOUT_MS is not set: it must
# outlast a restart (a pod stopped and started again under its name), or the broker drops
# the member and rebalances the group (docs/operations.md, "Deploys: StatefulSet and static group
# membership").
STATIC_SESSION_TIMEOUT_MS = 30_000


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names the variable."""


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe for logs); never raises."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{user}:***@{hostport}", parts.path, parts.query, ""))


@dataclass(frozen=True, slots=True)
class Settings:
    """All of ingest's configuration; see the README's configuration table."""

    database_url: str = field(repr=False)
    database_pool_min: int = 2
    database_pool_max: int = 10
    database_idle_timeout_ms: int = 10_000
    database_connection_timeout_ms: int = 2_000
    # None: half the write timeout.
    database_lock_timeout_ms: int | None = None
    database_keepalives_idle_s: int = 30
    database_keepalives_interval_s: int = 10
    database_keepalives_count: int = 3
    database_tcp_user_timeout_ms: int = 60_000
    database_ssl_mode: str | None = None
    database_ssl_root_cert: str | None = None
    database_ssl_cert: str | None = None
    database_ssl_key: str | None = None
    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_topics: tuple[str, ...] = ("call-events",)
    kafka_group_id: str = "call-events-ingest"
    # Static group membership (KIP-345): None is a dynamic member.
    kafka_group_instance_id: str | None = None
    kafka_dlq_topic: str = "call-events.dlq"
    kafka_dlq_create: bool = False
    kafka_dlq_partitions: int = 0
    kafka_dlq_replication: int = 0
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = field(default=None, repr=False)
    kafka_ssl_ca_file: str | None = None
    kafka_ssl_cert_file: str | None = None
    kafka_ssl_key_file: str | None = None
    kafka_session_timeout_ms: int = 10_000
    kafka_heartbeat_interval_ms: int = 3_000
    kafka_max_poll_interval_ms: int = 300_000
    kafka_fetch_max_wait_ms: int = 100
    kafka_request_timeout_ms: int = 20_000
    kafka_rebalance_timeout_ms: int = 10_000
    kafka_connections_max_idle_ms: int = 10_000
    kafka_metadata_max_age_ms: int = 60_000
    batch_max_events: int = 5_000
    write_lanes: int = 2
    batch_max_wait_ms: int = 200
    http_port: int = 8080
    shutdown_timeout_s: float = 25.0
    write_timeout_s: float = 10.0
    rebalance_timeout_s: float = 10.0
    retry_max_backoff_s: float = 10.0
    max_batch_bytes: int = 16 * 1024 * 1024
    breaker_window: int = 1_000
    breaker_max_ratio: float = 0.5
    breaker_min_records: int = 100
    breaker_max_consecutive: int = 1_000
    breaker_cooldown_s: float = 300.0
    on_retention_gap: str = "hold"
    chunk_interval: str = "1 day"
    compress_after: str = "7 days"
    retention: str = "off"
    dedup_window: str = "24 hours"
    readonly_password: str | None = field(default=None, repr=False)
    log_level: str = "info"

    @property
    def database_url_redacted(self) -> str:
        """The database URL with its password hidden."""
        return redact_url(self.database_url)

    @property
    def dedup_lookback(self) -> timedelta | None:
        """``INGEST_DEDUP_WINDOW`` as a duration (None: ``off``)."""
        if self.dedup_window == "off":
            return None
        return timedelta(seconds=interval_seconds(self.dedup_window))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read settings from ``env`` (default ``os.environ``); ConfigError on the first bad one."""
        e = os.environ if env is None else env
        d = cls.__dataclass_fields__

        def get(name: str, parse: Callable[[str, str], T], attr: str) -> T:
            raw = _value(e, name)
            if raw is None:
                default = d[attr].default
                return default  # type: ignore[return-value]
            return parse(name, raw)

        url = _value(e, "DATABASE_URL")
        if not url:
            raise ConfigError("DATABASE_URL is required (e.g. postgresql://user@host:5432/db)")
        if urlsplit(url).scheme not in ("postgres", "postgresql"):
            raise ConfigError("DATABASE_URL must start with postgresql:// or postgres://")

        s = cls(
            database_url=url,
            database_pool_min=get("DATABASE_POOL_MIN", _int(0, 1000), "database_pool_min"),
            database_pool_max=get("DATABASE_POOL_MAX", _int(1, 1000), "database_pool_max"),
            database_idle_timeout_ms=get(
                "DATABASE_IDLE_TIMEOUT", _int(0, 86_400_000), "database_idle_timeout_ms"
            ),
            database_connection_timeout_ms=get(
                "DATABASE_CONNECTION_TIMEOUT", _int(1, 600_000), "database_connection_timeout_ms"
            ),
            database_lock_timeout_ms=get(
                "DATABASE_LOCK_TIMEOUT", _int(1, 3_600_000), "database_lock_timeout_ms"
            ),
            database_keepalives_idle_s=get(
                "DATABASE_KEEPALIVES_IDLE", _int(1, 32_767), "database_keepalives_idle_s"
            ),
            database_keepalives_interval_s=get(
                "DATABASE_KEEPALIVES_INTERVAL", _int(1, 32_767), "database_keepalives_interval_s"
            ),
            database_keepalives_count=get(
                "DATABASE_KEEPALIVES_COUNT", _int(1, 127), "database_keepalives_count"
            ),
            database_tcp_user_timeout_ms=get(
                "DATABASE_TCP_USER_TIMEOUT", _int(1_000, 3_600_000), "database_tcp_user_timeout_ms"
            ),
            database_ssl_mode=get("DATABASE_SSL_MODE", _choice(SSL_MODES), "database_ssl_mode"),
            database_ssl_root_cert=get("DATABASE_SSL_ROOT_CERT", _file, "database_ssl_root_cert"),
            database_ssl_cert=get("DATABASE_SSL_CERT", _file, "database_ssl_cert"),
            database_ssl_key=get("DATABASE_SSL_KEY", _file, "database_ssl_key"),
            kafka_bootstrap_servers=get(
                "KAFKA_BOOTSTRAP_SERVERS", _text, "kafka_bootstrap_servers"
            ),
            kafka_security_protocol=get(
                "KAFKA_SECURITY_PROTOCOL", _choice(KAFKA_PROTOCOLS), "kafka_security_protocol"
            ),
            kafka_sasl_mechanism=get(
                "KAFKA_SASL_MECHANISM", _choice(SASL_MECHANISMS), "kafka_sasl_mechanism"
            ),
            kafka_sasl_username=get("KAFKA_SASL_USERNAME", _text, "kafka_sasl_username"),
            kafka_sasl_password=get("KAFKA_SASL_PASSWORD", _text, "kafka_sasl_password"),
            kafka_ssl_ca_file=get("KAFKA_SSL_CA_FILE", _file, "kafka_ssl_ca_file"),
            kafka_ssl_cert_file=get("KAFKA_SSL_CERT_FILE", _file, "kafka_ssl_cert_file"),
            kafka_ssl_key_file=get("KAFKA_SSL_KEY_FILE", _file, "kafka_ssl_key_file"),
            kafka_topics=get("KAFKA_TOPICS", _topics, "kafka_topics"),
            kafka_group_id=get("KAFKA_GROUP_ID", _text, "kafka_group_id"),
            kafka_group_instance_id=_group_instance_id(e),
            kafka_dlq_topic=get("KAFKA_DLQ_TOPIC", _text, "kafka_dlq_topic"),
            kafka_dlq_create=get("KAFKA_DLQ_CREATE", _bool, "kafka_dlq_create"),
            kafka_dlq_partitions=get(
                "KAFKA_DLQ_PARTITIONS", _int(0, 10_000), "kafka_dlq_partitions"
            ),
            kafka_dlq_replication=get(
                "KAFKA_DLQ_REPLICATION_FACTOR", _int(0, 100), "kafka_dlq_replication"
            ),
            kafka_session_timeout_ms=get(
                "KAFKA_SESSION_TIMEOUT_MS", _int(1_000, 3_600_000), "kafka_session_timeout_ms"
            ),
            kafka_heartbeat_interval_ms=get(
                "KAFKA_HEARTBEAT_INTERVAL_MS", _int(100, 3_600_000), "kafka_heartbeat_interval_ms"
            ),
            kafka_max_poll_interval_ms=get(
                "KAFKA_MAX_POLL_INTERVAL_MS", _int(1_000, 86_400_000), "kafka_max_poll_interval_ms"
            ),
            kafka_fetch_max_wait_ms=get(
                "KAFKA_FETCH_MAX_WAIT_MS", _int(0, 60_000), "kafka_fetch_max_wait_ms"
            ),
            kafka_request_timeout_ms=get(
                "KAFKA_REQUEST_TIMEOUT_MS", _int(1_000, 3_600_000), "kafka_request_timeout_ms"
            ),
            kafka_rebalance_timeout_ms=get(
                "KAFKA_REBALANCE_TIMEOUT_MS", _int(1_000, 3_600_000), "kafka_rebalance_timeout_ms"
            ),
            kafka_connections_max_idle_ms=get(
                "KAFKA_CONNECTIONS_MAX_IDLE_MS",
                _int(1_000, 86_400_000),
                "kafka_connections_max_idle_ms",
            ),
            kafka_metadata_max_age_ms=get(
                "KAFKA_METADATA_MAX_AGE_MS", _int(1_000, 3_600_000), "kafka_metadata_max_age_ms"
            ),
            batch_max_events=get("INGEST_BATCH_MAX_EVENTS", _int(1, 100_000), "batch_max_events"),
            write_lanes=get("INGEST_WRITE_LANES", _int(1, 8), "write_lanes"),
            batch_max_wait_ms=get("INGEST_BATCH_MAX_WAIT_MS", _int(1, 60_000), "batch_max_wait_ms"),
            http_port=get("INGEST_HTTP_PORT", _int(0, 65_535), "http_port"),
            shutdown_timeout_s=get(
                "INGEST_SHUTDOWN_TIMEOUT_S", _float(1, 3600), "shutdown_timeout_s"
            ),
            write_timeout_s=get("INGEST_WRITE_TIMEOUT_S", _float(1, 3600), "write_timeout_s"),
            rebalance_timeout_s=get(
                "INGEST_REBALANCE_TIMEOUT_S", _float(0, 600), "rebalance_timeout_s"
            ),
            retry_max_backoff_s=get(
                "INGEST_RETRY_MAX_BACKOFF_S", _float(0.1, 600), "retry_max_backoff_s"
            ),
            max_batch_bytes=get("INGEST_BATCH_MAX_BYTES", _int(1024, 1024**3), "max_batch_bytes"),
            breaker_window=get("INGEST_DLQ_BREAKER_WINDOW", _int(1, 10_000_000), "breaker_window"),
            breaker_max_ratio=get(
                "INGEST_DLQ_BREAKER_MAX_RATIO", _float(0, 1), "breaker_max_ratio"
            ),
            breaker_min_records=get(
                "INGEST_DLQ_BREAKER_MIN_RECORDS", _int(1, 10_000_000), "breaker_min_records"
            ),
            breaker_max_consecutive=get(
                "INGEST_DLQ_BREAKER_MAX_CONSECUTIVE",
                _int(1, 10_000_000),
                "breaker_max_consecutive",
            ),
            breaker_cooldown_s=get(
                "INGEST_DLQ_BREAKER_COOLDOWN_S", _float(0, 86_400), "breaker_cooldown_s"
            ),
            on_retention_gap=get(
                "INGEST_ON_RETENTION_GAP", _choice(RETENTION_GAP_ACTIONS), "on_retention_gap"
            ),
            chunk_interval=get("INGEST_CHUNK_INTERVAL", _text, "chunk_interval"),
            compress_after=get("INGEST_COMPRESS_AFTER", interval_or_off, "compress_after"),
            retention=get("INGEST_RETENTION", interval_or_off, "retention"),
            dedup_window=get("INGEST_DEDUP_WINDOW", interval_or_off, "dedup_window"),
            readonly_password=get("INGEST_READONLY_PASSWORD", _text, "readonly_password"),
            log_level=get("LOG_LEVEL", _log_level, "log_level"),
        )
        if s.kafka_group_instance_id and _value(e, "KAFKA_SESSION_TIMEOUT_MS") is None:
            s = replace(s, kafka_session_timeout_ms=STATIC_SESSION_TIMEOUT_MS)
        if s.database_pool_min > s.database_pool_max:
            raise ConfigError(
                f"DATABASE_POOL_MIN ({s.database_pool_min}) must not exceed "
                f"DATABASE_POOL_MAX ({s.database_pool_max})"
            )
        if s.write_lanes > s.database_pool_max:
            # Each lane holds a connection for its write in flight.
            raise ConfigError(
                f"INGEST_WRITE_LANES ({s.write_lanes}) must not exceed "
                f"DATABASE_POOL_MAX ({s.database_pool_max})"
            )
        if s.database_lock_timeout_ms is not None and (
            s.database_lock_timeout_ms >= s.write_timeout_s * 1000
        ):
            # The write timeout would end every lock wait first, and the session with it.
            raise ConfigError(
                f"DATABASE_LOCK_TIMEOUT ({s.database_lock_timeout_ms} ms) must be shorter than "
                f"INGEST_WRITE_TIMEOUT_S ({s.write_timeout_s:g} s)"
            )
        if s.kafka_security_protocol.startswith("SASL_") and not (
            s.kafka_sasl_username and s.kafka_sasl_password
        ):
            raise ConfigError(
                f"KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD are required with "
                f"KAFKA_SECURITY_PROTOCOL={s.kafka_security_protocol}"
            )
        if (s.database_ssl_cert is None) != (s.database_ssl_key is None):
            raise ConfigError("DATABASE_SSL_CERT and DATABASE_SSL_KEY go together")
        if s.kafka_heartbeat_interval_ms >= s.kafka_session_timeout_ms:
            raise ConfigError(
                "KAFKA_HEARTBEAT_INTERVAL_MS must be lower than KAFKA_SESSION_TIMEOUT_MS"
            )
        _check_kafka_timeouts(s)
        if s.retention != "off" and interval_seconds(s.retention) < _DAY:
            # The hourly aggregate's refresh looks back half the retention: at least 12 hours.
            raise ConfigError(f"INGEST_RETENTION must be at least 1 day, got {s.retention!r}")
        if (
            s.retention != "off"
            and s.compress_after != "off"
            and interval_seconds(s.retention) <= interval_seconds(s.compress_after)
        ):
            raise ConfigError(
                f"INGEST_RETENTION ({s.retention}) must be longer than "
                f"INGEST_COMPRESS_AFTER ({s.compress_after}), or 'off'"
            )
        if s.kafka_dlq_topic in s.kafka_topics:
            raise ConfigError("KAFKA_DLQ_TOPIC must not be one of KAFKA_TOPICS")
        return s


# What a Kafka request may take beyond the longest the broker may hold it on purpose: the
# trip there and back, and the broker's own work (Kafka's Java client gives a JoinGroup its
# rebalance timeout plus 5 s the same way).
KAFKA_RESPONSE_MARGIN_MS = 5_000


def _check_kafka_timeouts(s: Settings) -> None:
    """A request timeout shorter than what the broker may legitimately take would drop
    healthy connections: a JoinGroup is held until every member rejoined or the rebalance
    timeout ends, a fetch until data comes or KAFKA_FETCH_MAX_WAIT_MS ends. And a revocation
    may wait INGEST_REBALANCE_TIMEOUT_S for the write in flight before this member rejoins."""
    margin = KAFKA_RESPONSE_MARGIN_MS
    for name, held_ms in (
        ("KAFKA_REBALANCE_TIMEOUT_MS", s.kafka_rebalance_timeout_ms),
        ("KAFKA_FETCH_MAX_WAIT_MS", s.kafka_fetch_max_wait_ms),
    ):
        if s.kafka_request_timeout_ms < held_ms + margin:
            raise ConfigError(
                f"KAFKA_REQUEST_TIMEOUT_MS ({s.kafka_request_timeout_ms}) must be at least "
                f"{margin} more than {name} ({held_ms}): the broker may hold a request "
                f"that long before it answers"
            )
    if s.kafka_rebalance_timeout_ms < s.rebalance_timeout_s * 1000:
        raise ConfigError(
            f"KAFKA_REBALANCE_TIMEOUT_MS ({s.kafka_rebalance_timeout_ms}) must not be shorter "
            f"than INGEST_REBALANCE_TIMEOUT_S ({s.rebalance_timeout_s:g} s): a revocation may "
            f"wait that long for the write in flight before the member rejoins"
        )


def _value(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value; ``NAME_FILE`` (a mounted secret) is read when ``NAME`` is unset."""
    raw = env.get(name)
    if raw is not None and raw.strip() != "":
        return raw.strip()
    path = env.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE: cannot read {path!r}: {exc.strerror}") from None
    return None


def _group_instance_id(env: Mapping[str, str]) -> str | None:
    """``KAFKA_GROUP_INSTANCE_ID``; unset, the pod name (``POD_NAME``, from the Downward
    API); ``off`` for a dynamic member even where a pod name is set."""
    raw = _value(env, "KAFKA_GROUP_INSTANCE_ID")
    name = "KAFKA_GROUP_INSTANCE_ID"
    if raw is None:
        raw, name = _value(env, "POD_NAME"), "POD_NAME"
    if raw is None or raw.lower() == "off":
        return None
    if not _INSTANCE_ID.fullmatch(raw) or raw in (".", ".."):
        raise ConfigError(
            f"{name} must be up to 249 of the characters a-z A-Z 0-9 . _ - (a group "
            f"instance id), got {raw!r}"
        )
    return raw


def _text(name: str, raw: str) -> str:
    if not raw:
        raise ConfigError(f"{name} must not be empty")
    return raw


def _int(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            v = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if not lo <= v <= hi:
            raise ConfigError(f"{name} must be between {lo} and {hi}, got {v}")
        return v

    return parse


def _float(lo: float, hi: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            v = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not lo <= v <= hi:
            raise ConfigError(f"{name} must be between {lo} and {hi}, got {v}")
        return v

    return parse


def _bool(name: str, raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _topics(name: str, raw: str) -> tuple[str, ...]:
    topics = tuple(t.strip() for t in raw.split(",") if t.strip())
    if not topics:
        raise ConfigError(f"{name} must name at least one topic")
    return topics


def _choice(options: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        for option in options:
            if raw.lower() == option.lower():
                return option
        raise ConfigError(f"{name} must be one of {', '.join(options)}, got {raw!r}")

    return parse


def _file(name: str, raw: str) -> str:
    if not Path(raw).is_file():
        raise ConfigError(f"{name}: no such file {raw!r}")
    return raw


# Seconds per unit as PostgreSQL compares intervals (a month is 30 days, a year 12 months).
_INTERVAL_UNITS = {
    "second": 1,
    "minute": 60,
    "hour": 3_600,
    "day": 86_400,
    "week": 7 * 86_400,
    "month": 30 * 86_400,
    "year": 360 * 86_400,
}
_DAY = _INTERVAL_UNITS["day"]
_INTERVAL_PART = re.compile(r"(\d+)\s*(second|minute|hour|day|week|month|year)s?")
_INTERVAL = re.compile(rf"^\s*{_INTERVAL_PART.pattern}(\s+{_INTERVAL_PART.pattern})*\s*$")


def interval_seconds(text: str) -> int:
    """Length of an interval such as ``7 days`` or ``1 month 2 weeks``; ValueError otherwise.

    Only this small subset of PostgreSQL's interval syntax is accepted, so that what passes
    here is a valid, positive interval there too.
    """
    low = text.lower()
    if not _INTERVAL.match(low):
        raise ValueError(text)
    total = sum(int(n) * _INTERVAL_UNITS[unit] for n, unit in _INTERVAL_PART.findall(low))
    if total <= 0:
        raise ValueError(text)
    return total


def interval_or_off(name: str, raw: str) -> str:
    """``raw`` when it is a positive interval (``'7 days'``), ``'off'`` for any case of off;
    ``ConfigError`` naming the variable ``name`` otherwise."""
    if raw.lower() == "off":
        return "off"
    try:
        interval_seconds(raw)
    except ValueError:
        raise ConfigError(
            f"{name} must be 'off' or a positive interval such as '7 days' or '12 hours', "
            f"got {raw!r}"
        ) from None
    return raw


def _log_level(name: str, raw: str) -> str:
    low = raw.lower()
    if low not in LOG_LEVELS:
        raise ConfigError(f"{name} must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return low
