"""INGEST_COMPRESS_AFTER and INGEST_RETENTION: the lifecycle settings `migrate up` applies."""

from __future__ import annotations

import pytest

from ingest.service.settings import ConfigError, Settings, interval_seconds

URL = "postgresql://ingest@db:5432/calls"


def load(**env: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": URL, **env})


def test_compression_after_seven_days_and_no_retention_by_default() -> None:
    s = load()
    assert (s.compress_after, s.retention) == ("7 days", "off")


@pytest.mark.parametrize("raw", ["12 hours", "30 days", "1 month 2 weeks", "2 Weeks", "1 year"])
def test_compress_after_takes_an_interval(raw: str) -> None:
    assert load(INGEST_COMPRESS_AFTER=raw).compress_after == raw


@pytest.mark.parametrize("raw", ["off", "OFF", "Off"])
def test_off_disables_a_policy(raw: str) -> None:
    s = load(INGEST_COMPRESS_AFTER=raw, INGEST_RETENTION=raw)
    assert (s.compress_after, s.retention) == ("off", "off")


@pytest.mark.parametrize(
    "raw", ["soon", "0 days", "-1 day", "7 dayz", "1.5 days", "7", "7 days; DROP TABLE calls"]
)
@pytest.mark.parametrize("variable", ["INGEST_COMPRESS_AFTER", "INGEST_RETENTION"])
def test_a_bad_interval_names_the_variable_and_the_value(variable: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{variable: raw})
    assert variable in str(info.value)
    assert repr(raw) in str(info.value)


def test_retention_must_outlast_compression() -> None:
    with pytest.raises(ConfigError, match=r"INGEST_RETENTION .* longer than INGEST_COMPRESS_AFTER"):
        load(INGEST_COMPRESS_AFTER="30 days", INGEST_RETENTION="4 weeks")


def test_retention_longer_than_compression_is_accepted() -> None:
    s = load(INGEST_COMPRESS_AFTER="7 days", INGEST_RETENTION="1 year")
    assert s.retention == "1 year"


def test_retention_without_compression_may_be_short() -> None:
    assert load(INGEST_COMPRESS_AFTER="off", INGEST_RETENTION="1 day").retention == "1 day"


def test_retention_is_at_least_a_day() -> None:
    with pytest.raises(ConfigError, match="INGEST_RETENTION must be at least 1 day"):
        load(INGEST_COMPRESS_AFTER="off", INGEST_RETENTION="23 hours")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1 second", 1),
        ("90 minutes", 5_400),
        ("7 days", 604_800),
        ("1 week 1 day", 691_200),
        ("1 month", 2_592_000),
        ("1 year", 31_104_000),
    ],
)
def test_interval_length_as_postgresql_compares_intervals(text: str, seconds: int) -> None:
    assert interval_seconds(text) == seconds
