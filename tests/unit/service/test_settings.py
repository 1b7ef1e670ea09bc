"""Configuration from the environment: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ingest.service.settings import KAFKA_RESPONSE_MARGIN_MS, ConfigError, Settings, redact_url

URL = "postgresql://ingest@db:5432/calls"
SECRET_URL = "postgresql://ingest:s3cret@db:5432/calls?sslmode=require"

ALL_VARIABLES = (
    "DATABASE_URL",
    "DATABASE_POOL_MIN",
    "DATABASE_POOL_MAX",
    "DATABASE_IDLE_TIMEOUT",
    "DATABASE_CONNECTION_TIMEOUT",
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_TOPICS",
    "KAFKA_GROUP_ID",
    "KAFKA_DLQ_TOPIC",
    "KAFKA_DLQ_CREATE",
    "KAFKA_DLQ_PARTITIONS",
    "KAFKA_DLQ_REPLICATION_FACTOR",
    "INGEST_BATCH_MAX_EVENTS",
    "INGEST_BATCH_MAX_WAIT_MS",
    "INGEST_HTTP_PORT",
    "INGEST_SHUTDOWN_TIMEOUT_S",
    "INGEST_REBALANCE_TIMEOUT_S",
    "INGEST_RETRY_MAX_BACKOFF_S",
    "INGEST_CHUNK_INTERVAL",
    "INGEST_DEDUP_WINDOW",
    "LOG_LEVEL",
)


def load(**env: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": URL, **env})


def config_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    return str(info.value)


# --- defaults -------------------------------------------------------------------------------


def test_defaults_with_only_database_url() -> None:
    s = load()

    assert s.database_url == URL
    assert (s.database_pool_min, s.database_pool_max) == (2, 10)
    assert s.database_idle_timeout_ms == 10_000
    assert s.database_connection_timeout_ms == 2_000
    assert s.kafka_bootstrap_servers == "localhost:9092"
    assert s.kafka_topics == ("call-events",)
    assert s.kafka_group_id == "call-events-ingest"
    assert s.kafka_dlq_topic == "call-events.dlq"
    assert s.kafka_dlq_create is False
    assert s.kafka_dlq_partitions == 0
    assert s.kafka_dlq_replication == 0
    assert s.batch_max_events == 5_000
    assert s.batch_max_wait_ms == 200
    assert s.http_port == 8080
    assert s.shutdown_timeout_s == 25.0
    assert s.rebalance_timeout_s == 10.0
    assert s.retry_max_backoff_s == 10.0
    assert s.chunk_interval == "1 day"
    assert s.log_level == "info"
    assert s.on_retention_gap == "hold"


def test_blank_variable_means_default() -> None:
    s = load(INGEST_HTTP_PORT="   ", KAFKA_TOPICS="")

    assert (s.http_port, s.kafka_topics) == (8080, ("call-events",))


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"{name}_FILE", raising=False)
    monkeypatch.setenv("DATABASE_URL", URL)
    monkeypatch.setenv("INGEST_HTTP_PORT", "9100")

    assert Settings.from_env().http_port == 9100


# --- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "raw", "attr", "expected"),
    [
        ("DATABASE_POOL_MIN", "0", "database_pool_min", 0),
        ("DATABASE_POOL_MAX", "50", "database_pool_max", 50),
        ("DATABASE_IDLE_TIMEOUT", "0", "database_idle_timeout_ms", 0),
        ("DATABASE_CONNECTION_TIMEOUT", "5000", "database_connection_timeout_ms", 5000),
        ("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9", "kafka_bootstrap_servers", "k1:9092,k2:9"),
        ("KAFKA_TOPICS", "a", "kafka_topics", ("a",)),
        ("KAFKA_TOPICS", " a , b,, c ", "kafka_topics", ("a", "b", "c")),
        ("KAFKA_GROUP_ID", "group-2", "kafka_group_id", "group-2"),
        ("KAFKA_DLQ_TOPIC", "dead", "kafka_dlq_topic", "dead"),
        ("KAFKA_DLQ_CREATE", "true", "kafka_dlq_create", True),
        ("KAFKA_DLQ_PARTITIONS", "6", "kafka_dlq_partitions", 6),
        ("KAFKA_DLQ_REPLICATION_FACTOR", "3", "kafka_dlq_replication", 3),
        ("INGEST_BATCH_MAX_EVENTS", "100", "batch_max_events", 100),
        ("INGEST_WRITE_LANES", "1", "write_lanes", 1),
        ("INGEST_BATCH_MAX_WAIT_MS", "50", "batch_max_wait_ms", 50),
        ("INGEST_HTTP_PORT", "9000", "http_port", 9000),
        ("INGEST_HTTP_PORT", "0", "http_port", 0),
        ("INGEST_SHUTDOWN_TIMEOUT_S", "2.5", "shutdown_timeout_s", 2.5),
        ("INGEST_REBALANCE_TIMEOUT_S", "0", "rebalance_timeout_s", 0.0),
        ("INGEST_RETRY_MAX_BACKOFF_S", "0.5", "retry_max_backoff_s", 0.5),
        ("INGEST_CHUNK_INTERVAL", "1 hour", "chunk_interval", "1 hour"),
        ("INGEST_ON_RETENTION_GAP", "skip", "on_retention_gap", "skip"),
        ("INGEST_ON_RETENTION_GAP", "HOLD", "on_retention_gap", "hold"),
        ("LOG_LEVEL", "DEBUG", "log_level", "debug"),
        ("LOG_LEVEL", "warning", "log_level", "warning"),
    ],
)
def test_each_variable_is_parsed(variable: str, raw: str, attr: str, expected: Any) -> None:
    assert getattr(load(**{variable: raw}), attr) == expected


def test_values_are_stripped() -> None:
    s = load(INGEST_HTTP_PORT=" 9000\n", KAFKA_GROUP_ID="  g  ")

    assert (s.http_port, s.kafka_group_id) == (9000, "g")


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on"])
def test_true_spellings(raw: str) -> None:
    assert load(KAFKA_DLQ_CREATE=raw).kafka_dlq_create is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "off"])
def test_false_spellings(raw: str) -> None:
    assert load(KAFKA_DLQ_CREATE=raw).kafka_dlq_create is False


def test_postgres_scheme_is_accepted() -> None:
    assert load(DATABASE_URL="postgres://u@h/db").database_url == "postgres://u@h/db"


# --- bad values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("DATABASE_POOL_MIN", "-1"),
        ("DATABASE_POOL_MIN", "1001"),
        ("DATABASE_POOL_MIN", "two"),
        ("DATABASE_POOL_MAX", "0"),
        ("DATABASE_POOL_MAX", "1001"),
        ("DATABASE_IDLE_TIMEOUT", "-1"),
        ("DATABASE_IDLE_TIMEOUT", "86400001"),
        ("DATABASE_CONNECTION_TIMEOUT", "0"),
        ("DATABASE_CONNECTION_TIMEOUT", "2s"),
        ("KAFKA_TOPICS", ","),
        ("KAFKA_TOPICS", " , , "),
        ("KAFKA_DLQ_CREATE", "maybe"),
        ("KAFKA_DLQ_CREATE", "2"),
        ("KAFKA_DLQ_PARTITIONS", "-1"),
        ("KAFKA_DLQ_PARTITIONS", "10001"),
        ("KAFKA_DLQ_REPLICATION_FACTOR", "-2"),
        ("KAFKA_DLQ_REPLICATION_FACTOR", "101"),
        ("INGEST_BATCH_MAX_EVENTS", "0"),
        ("INGEST_BATCH_MAX_EVENTS", "100001"),
        ("INGEST_BATCH_MAX_EVENTS", "1.5"),
        ("INGEST_WRITE_LANES", "0"),
        ("INGEST_WRITE_LANES", "9"),
        ("INGEST_BATCH_MAX_WAIT_MS", "0"),
        ("INGEST_BATCH_MAX_WAIT_MS", "60001"),
        ("INGEST_HTTP_PORT", "-1"),
        ("INGEST_HTTP_PORT", "65536"),
        ("INGEST_HTTP_PORT", "http"),
        ("INGEST_SHUTDOWN_TIMEOUT_S", "0.5"),
        ("INGEST_SHUTDOWN_TIMEOUT_S", "3601"),
        ("INGEST_SHUTDOWN_TIMEOUT_S", "soon"),
        ("INGEST_SHUTDOWN_TIMEOUT_S", "nan"),
        ("INGEST_SHUTDOWN_TIMEOUT_S", "inf"),
        ("INGEST_REBALANCE_TIMEOUT_S", "-1"),
        ("INGEST_REBALANCE_TIMEOUT_S", "601"),
        ("INGEST_RETRY_MAX_BACKOFF_S", "0.05"),
        ("INGEST_RETRY_MAX_BACKOFF_S", "601"),
        ("INGEST_ON_RETENTION_GAP", "earliest"),
        ("INGEST_ON_RETENTION_GAP", "ignore"),
        ("LOG_LEVEL", "verbose"),
        ("LOG_LEVEL", "trace"),
    ],
)
def test_bad_value_raises_config_error_naming_the_variable(variable: str, raw: str) -> None:
    message = config_error({"DATABASE_URL": URL, variable: raw})

    assert message.startswith(variable)


def test_bad_value_message_shows_the_value() -> None:
    assert "'sometimes'" in config_error({"DATABASE_URL": URL, "KAFKA_DLQ_CREATE": "sometimes"})


def test_database_url_is_required() -> None:
    assert config_error({}).startswith("DATABASE_URL is required")


def test_blank_database_url_counts_as_missing() -> None:
    assert config_error({"DATABASE_URL": "  "}).startswith("DATABASE_URL is required")


@pytest.mark.parametrize("url", ["mysql://u@h/db", "db:5432/calls", "http://h/db"])
def test_database_url_must_be_postgresql(url: str) -> None:
    assert config_error({"DATABASE_URL": url}).startswith("DATABASE_URL")


def test_pool_min_above_max_is_rejected() -> None:
    message = config_error(
        {"DATABASE_URL": URL, "DATABASE_POOL_MIN": "5", "DATABASE_POOL_MAX": "4"}
    )

    assert "DATABASE_POOL_MIN" in message
    assert "DATABASE_POOL_MAX" in message


def test_pool_max_below_default_min_is_rejected() -> None:
    assert "DATABASE_POOL_MIN" in config_error({"DATABASE_URL": URL, "DATABASE_POOL_MAX": "1"})


def test_write_lanes_default_to_two() -> None:
    assert load().write_lanes == 2


def test_write_lanes_above_pool_max_are_rejected() -> None:
    message = config_error(
        {
            "DATABASE_URL": URL,
            "DATABASE_POOL_MIN": "1",
            "DATABASE_POOL_MAX": "2",
            "INGEST_WRITE_LANES": "3",
        }
    )
    assert message == "INGEST_WRITE_LANES (3) must not exceed DATABASE_POOL_MAX (2)"


def test_pool_min_equal_to_max_is_accepted() -> None:
    s = load(DATABASE_POOL_MIN="4", DATABASE_POOL_MAX="4")

    assert (s.database_pool_min, s.database_pool_max) == (4, 4)


# --- the database sessions' limits -----------------------------------------------------------


def test_session_limits_default_to_seconds_for_a_batch_and_a_minute_for_a_dead_peer() -> None:
    s = load()

    assert s.write_timeout_s == 10.0
    assert s.database_lock_timeout_ms is None  # half the write timeout
    assert (
        s.database_keepalives_idle_s,
        s.database_keepalives_interval_s,
        s.database_keepalives_count,
    ) == (30, 10, 3)
    assert s.database_tcp_user_timeout_ms == 60_000


@pytest.mark.parametrize(
    ("variable", "raw", "attr", "expected"),
    [
        ("INGEST_WRITE_TIMEOUT_S", "30", "write_timeout_s", 30.0),
        ("DATABASE_LOCK_TIMEOUT", "250", "database_lock_timeout_ms", 250),
        ("DATABASE_KEEPALIVES_IDLE", "5", "database_keepalives_idle_s", 5),
        ("DATABASE_KEEPALIVES_INTERVAL", "2", "database_keepalives_interval_s", 2),
        ("DATABASE_KEEPALIVES_COUNT", "9", "database_keepalives_count", 9),
        ("DATABASE_TCP_USER_TIMEOUT", "15000", "database_tcp_user_timeout_ms", 15_000),
    ],
)
def test_each_session_limit_is_parsed(variable: str, raw: str, attr: str, expected: Any) -> None:
    assert getattr(load(**{variable: raw}), attr) == expected


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("INGEST_WRITE_TIMEOUT_S", "0.5"),
        ("INGEST_WRITE_TIMEOUT_S", "3601"),
        ("DATABASE_LOCK_TIMEOUT", "0"),
        ("DATABASE_LOCK_TIMEOUT", "5s"),
        ("DATABASE_KEEPALIVES_IDLE", "0"),
        ("DATABASE_KEEPALIVES_IDLE", "32768"),
        ("DATABASE_KEEPALIVES_INTERVAL", "0"),
        ("DATABASE_KEEPALIVES_INTERVAL", "1.5"),
        ("DATABASE_KEEPALIVES_COUNT", "0"),
        ("DATABASE_KEEPALIVES_COUNT", "128"),
        ("DATABASE_TCP_USER_TIMEOUT", "999"),
        ("DATABASE_TCP_USER_TIMEOUT", "3600001"),
    ],
)
def test_bad_session_limit_raises_config_error_naming_the_variable(variable: str, raw: str) -> None:
    assert config_error({"DATABASE_URL": URL, variable: raw}).startswith(variable)


def test_lock_timeout_not_shorter_than_the_write_timeout_is_rejected() -> None:
    message = config_error(
        {"DATABASE_URL": URL, "INGEST_WRITE_TIMEOUT_S": "5", "DATABASE_LOCK_TIMEOUT": "5000"}
    )

    assert message.startswith("DATABASE_LOCK_TIMEOUT")
    assert "INGEST_WRITE_TIMEOUT_S" in message


def test_lock_timeout_just_below_the_write_timeout_is_accepted() -> None:
    s = load(INGEST_WRITE_TIMEOUT_S="5", DATABASE_LOCK_TIMEOUT="4999")

    assert s.database_lock_timeout_ms == 4_999


def test_dlq_topic_must_not_be_a_source_topic() -> None:
    message = config_error({"DATABASE_URL": URL, "KAFKA_TOPICS": "a,b", "KAFKA_DLQ_TOPIC": "b"})

    assert message.startswith("KAFKA_DLQ_TOPIC")


# --- Kafka client timeouts ------------------------------------------------------------------


def test_kafka_timeouts_default_to_noticing_a_dead_connection_within_seconds() -> None:
    s = load()

    assert s.kafka_request_timeout_ms == 20_000
    assert s.kafka_rebalance_timeout_ms == 10_000
    assert s.kafka_connections_max_idle_ms == 10_000


@pytest.mark.parametrize(
    ("variable", "raw", "attr", "expected"),
    [
        ("KAFKA_REQUEST_TIMEOUT_MS", "30000", "kafka_request_timeout_ms", 30_000),
        ("KAFKA_CONNECTIONS_MAX_IDLE_MS", "540000", "kafka_connections_max_idle_ms", 540_000),
        ("KAFKA_CONNECTIONS_MAX_IDLE_MS", "1000", "kafka_connections_max_idle_ms", 1_000),
    ],
)
def test_each_kafka_timeout_is_parsed(variable: str, raw: str, attr: str, expected: int) -> None:
    assert getattr(load(**{variable: raw}), attr) == expected


def test_rebalance_timeout_is_parsed_with_a_request_timeout_that_outlasts_it() -> None:
    s = load(KAFKA_REBALANCE_TIMEOUT_MS="60000", KAFKA_REQUEST_TIMEOUT_MS="65000")

    assert (s.kafka_rebalance_timeout_ms, s.kafka_request_timeout_ms) == (60_000, 65_000)


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("KAFKA_REQUEST_TIMEOUT_MS", "999"),
        ("KAFKA_REQUEST_TIMEOUT_MS", "3600001"),
        ("KAFKA_REQUEST_TIMEOUT_MS", "15s"),
        ("KAFKA_REBALANCE_TIMEOUT_MS", "999"),
        ("KAFKA_REBALANCE_TIMEOUT_MS", "3600001"),
        ("KAFKA_CONNECTIONS_MAX_IDLE_MS", "999"),
        ("KAFKA_CONNECTIONS_MAX_IDLE_MS", "86400001"),
        ("KAFKA_CONNECTIONS_MAX_IDLE_MS", "never"),
    ],
)
def test_bad_kafka_timeout_raises_config_error_naming_it(variable: str, raw: str) -> None:
    assert config_error({"DATABASE_URL": URL, variable: raw}).startswith(variable)


# --- Kafka metadata refresh -------------------------------------------------------------------


def test_partitions_added_to_a_topic_are_looked_for_every_minute_by_default() -> None:
    assert load().kafka_metadata_max_age_ms == 60_000


@pytest.mark.parametrize("raw", ["1000", "3600000"])
def test_the_metadata_age_is_parsed_within_its_bounds(raw: str) -> None:
    assert load(KAFKA_METADATA_MAX_AGE_MS=raw).kafka_metadata_max_age_ms == int(raw)


@pytest.mark.parametrize("raw", ["999", "3600001", "1m"])
def test_a_bad_metadata_age_raises_config_error_naming_it(raw: str) -> None:
    message = config_error({"DATABASE_URL": URL, "KAFKA_METADATA_MAX_AGE_MS": raw})

    assert message.startswith("KAFKA_METADATA_MAX_AGE_MS")


def test_request_timeout_must_outlast_the_rebalance_timeout_by_the_margin() -> None:
    # The broker may hold a JoinGroup until the rebalance timeout: a request timeout that
    # ends first would drop the coordinator connection in the middle of every rebalance.
    message = config_error(
        {
            "DATABASE_URL": URL,
            "KAFKA_REBALANCE_TIMEOUT_MS": "10000",
            "KAFKA_REQUEST_TIMEOUT_MS": str(10_000 + KAFKA_RESPONSE_MARGIN_MS - 1),
        }
    )

    assert message.startswith("KAFKA_REQUEST_TIMEOUT_MS")
    assert "KAFKA_REBALANCE_TIMEOUT_MS" in message


def test_request_timeout_of_exactly_the_rebalance_timeout_and_the_margin_is_accepted() -> None:
    s = load(KAFKA_REQUEST_TIMEOUT_MS=str(10_000 + KAFKA_RESPONSE_MARGIN_MS))

    assert s.kafka_request_timeout_ms == 10_000 + KAFKA_RESPONSE_MARGIN_MS


def test_request_timeout_must_outlast_the_fetch_wait_by_the_margin() -> None:
    message = config_error(
        {
            "DATABASE_URL": URL,
            "KAFKA_FETCH_MAX_WAIT_MS": "20000",
            "KAFKA_REQUEST_TIMEOUT_MS": str(20_000 + KAFKA_RESPONSE_MARGIN_MS - 1),
        }
    )

    assert message.startswith("KAFKA_REQUEST_TIMEOUT_MS")
    assert "KAFKA_FETCH_MAX_WAIT_MS" in message


def test_rebalance_timeout_must_cover_the_revocation_wait() -> None:
    # A revocation waits up to INGEST_REBALANCE_TIMEOUT_S for the write in flight before
    # the member sends its JoinGroup; the broker must wait for it at least that long.
    message = config_error({"DATABASE_URL": URL, "INGEST_REBALANCE_TIMEOUT_S": "10.5"})

    assert message.startswith("KAFKA_REBALANCE_TIMEOUT_MS")
    assert "INGEST_REBALANCE_TIMEOUT_S" in message


def test_a_longer_session_timeout_leaves_the_request_timeout_valid() -> None:
    # The rebalance timeout is set on its own, not left to follow the session timeout as
    # aiokafka would: a long session (static membership) needs no longer request timeout.
    s = load(KAFKA_SESSION_TIMEOUT_MS="45000")

    assert (s.kafka_session_timeout_ms, s.kafka_request_timeout_ms) == (45_000, 20_000)


# --- static group membership ----------------------------------------------------------------


def test_a_dynamic_member_by_default() -> None:
    assert load().kafka_group_instance_id is None


def test_group_instance_id_is_read() -> None:
    assert load(KAFKA_GROUP_INSTANCE_ID="ingest-2").kafka_group_instance_id == "ingest-2"


def test_group_instance_id_defaults_to_the_pod_name() -> None:
    assert load(POD_NAME="ingest-worker-1").kafka_group_instance_id == "ingest-worker-1"


def test_group_instance_id_wins_over_the_pod_name() -> None:
    s = load(POD_NAME="ingest-worker-1", KAFKA_GROUP_INSTANCE_ID="replica-a")

    assert s.kafka_group_instance_id == "replica-a"


def test_group_instance_id_off_makes_a_dynamic_member_despite_a_pod_name() -> None:
    assert (
        load(POD_NAME="ingest-worker-1", KAFKA_GROUP_INSTANCE_ID="off").kafka_group_instance_id
        is None
    )


def test_a_dynamic_member_has_a_10_s_session() -> None:
    assert load().kafka_session_timeout_ms == 10_000


def test_a_static_member_has_a_30_s_session_to_outlast_a_restart() -> None:
    assert load(POD_NAME="ingest-0").kafka_session_timeout_ms == 30_000


def test_a_static_members_session_timeout_may_be_set() -> None:
    s = load(POD_NAME="ingest-0", KAFKA_SESSION_TIMEOUT_MS="20000")

    assert s.kafka_session_timeout_ms == 20_000


@pytest.mark.parametrize("raw", ["a b", "pod/1", "..", "x" * 250, "ünïcode"])
def test_group_instance_id_outside_kafkas_rule_is_rejected(raw: str) -> None:
    message = config_error({"DATABASE_URL": URL, "KAFKA_GROUP_INSTANCE_ID": raw})

    assert message.startswith("KAFKA_GROUP_INSTANCE_ID must be")


def test_a_bad_pod_name_is_reported_as_pod_name() -> None:
    message = config_error({"DATABASE_URL": URL, "POD_NAME": "a b"})

    assert message.startswith("POD_NAME must be")


# --- *_FILE ---------------------------------------------------------------------------------


def test_database_url_is_read_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "database_url"
    secret.write_text(SECRET_URL + "\n", encoding="utf-8")

    s = Settings.from_env({"DATABASE_URL_FILE": str(secret)})

    assert s.database_url == SECRET_URL


def test_any_variable_may_come_from_a_file(tmp_path: Path) -> None:
    port = tmp_path / "port"
    port.write_text(" 9001 \n", encoding="utf-8")

    assert load(INGEST_HTTP_PORT_FILE=str(port)).http_port == 9001


def test_variable_wins_over_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "database_url"
    secret.write_text(SECRET_URL, encoding="utf-8")

    s = Settings.from_env({"DATABASE_URL": URL, "DATABASE_URL_FILE": str(secret)})

    assert s.database_url == URL


def test_blank_variable_falls_back_to_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "database_url"
    secret.write_text(SECRET_URL, encoding="utf-8")

    s = Settings.from_env({"DATABASE_URL": "", "DATABASE_URL_FILE": str(secret)})

    assert s.database_url == SECRET_URL


def test_unreadable_file_raises_config_error_naming_the_file_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope"

    message = config_error({"DATABASE_URL_FILE": str(missing)})

    assert message.startswith("DATABASE_URL_FILE")
    assert str(missing) in message


def test_value_read_from_file_is_validated(tmp_path: Path) -> None:
    port = tmp_path / "port"
    port.write_text("eighty", encoding="utf-8")

    assert config_error({"DATABASE_URL": URL, "INGEST_HTTP_PORT_FILE": str(port)}).startswith(
        "INGEST_HTTP_PORT"
    )


def test_empty_file_for_text_variable_is_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "group"
    empty.write_text("  \n", encoding="utf-8")

    message = config_error({"DATABASE_URL": URL, "KAFKA_GROUP_ID_FILE": str(empty)})

    assert message.startswith("KAFKA_GROUP_ID")


# --- secrets stay out of logs ---------------------------------------------------------------


def test_redact_url_hides_the_password() -> None:
    redacted = redact_url(SECRET_URL)

    assert "s3cret" not in redacted
    assert redacted == "postgresql://ingest:***@db:5432/calls?sslmode=require"


def test_redact_url_keeps_url_without_password() -> None:
    assert redact_url(URL) == URL
    assert redact_url("postgresql:///calls") == "postgresql:///calls"


def test_redact_url_hides_percent_encoded_password() -> None:
    redacted = redact_url("postgresql://u:p%40ss@db/calls")

    assert "p%40ss" not in redacted
    assert redacted == "postgresql://u:***@db/calls"


def test_redact_url_of_unparseable_url_says_so() -> None:
    assert redact_url("postgresql://[db") == "<unparseable url>"


def test_redact_url_keeps_ipv6_host_brackets() -> None:
    assert redact_url("postgresql://u:pw@[::1]:5432/db") == "postgresql://u:***@[::1]:5432/db"


def test_redact_url_never_raises_on_a_bad_port() -> None:
    assert "pw" not in redact_url("postgresql://u:pw@db:99999/calls")


def test_settings_repr_hides_database_url() -> None:
    assert "s3cret" not in repr(load(DATABASE_URL=SECRET_URL))


def test_database_url_redacted_hides_the_password() -> None:
    s = load(DATABASE_URL=SECRET_URL)

    assert s.database_url_redacted == "postgresql://ingest:***@db:5432/calls?sslmode=require"


# --- INGEST_DEDUP_WINDOW --------------------------------------------------------------------


def test_dedup_window_defaults_to_24_hours() -> None:
    s = load()

    assert (s.dedup_window, s.dedup_lookback) == ("24 hours", timedelta(hours=24))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("12 hours", timedelta(hours=12)),
        ("2 days", timedelta(days=2)),
        ("1 day 30 minutes", timedelta(days=1, minutes=30)),
    ],
)
def test_dedup_window_is_an_interval(raw: str, expected: timedelta) -> None:
    assert load(INGEST_DEDUP_WINDOW=raw).dedup_lookback == expected


@pytest.mark.parametrize("raw", ["off", "OFF"])
def test_dedup_window_off_turns_the_look_back_off(raw: str) -> None:
    s = load(INGEST_DEDUP_WINDOW=raw)

    assert (s.dedup_window, s.dedup_lookback) == ("off", None)


@pytest.mark.parametrize("raw", ["24", "0 hours", "-1 day", "yesterday", "1 fortnight"])
def test_dedup_window_must_be_a_positive_interval_or_off(raw: str) -> None:
    message = config_error({"DATABASE_URL": URL, "INGEST_DEDUP_WINDOW": raw})

    assert message.startswith("INGEST_DEDUP_WINDOW must be 'off' or a positive interval")
