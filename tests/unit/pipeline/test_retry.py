"""Retrying: what a failed try does to metrics, logs and readiness, how long the next wait
is, and how every wait gives way to a shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.errors import KafkaConnectionError
from asyncpg import exceptions as pg
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from ingest.pipeline.policy import Backoff, Disposition
from ingest.pipeline.retry import (
    CLOSE_RESERVE_S,
    STANDING_LOG_EVERY_S,
    STANDING_RETRY_MIN_S,
    Retries,
    Shutdown,
    ShutdownRequested,
    short_error,
)
from ingest.service.probes import Health


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def retries(health: Health | None = None, clock: Clock | None = None) -> Retries:
    return Retries(health or Health(), max_backoff_s=1.0, clock=clock or Clock())


def standing() -> BaseException:
    return pg.InvalidPasswordError("password authentication failed")  # 28P01


def transient() -> BaseException:
    return pg.AdminShutdownError("terminating connection")  # 57P01


def retries_counted(target: str) -> float:
    return REGISTRY.get_sample_value("ingest_retries_total", {"target": target}) or 0.0


def test_a_standing_fault_is_logged_once_a_minute() -> None:
    clock = Clock()
    r = retries(clock=clock)

    with capture_logs() as logs:
        for _ in range(3):
            r.note(standing())
            clock.now += STANDING_LOG_EVERY_S / 3
        r.note(standing())

    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == [
        "standing fault; consumption paused until it is fixed",
        "standing fault; consumption paused until it is fixed",
    ]
    assert errors[0]["target"] == "database"


def test_a_transient_failure_is_logged_at_every_try() -> None:
    r = retries()

    with capture_logs() as logs:
        for _ in range(3):
            r.note(transient())

    assert [e["event"] for e in logs] == ["transient failure; retrying"] * 3


def test_a_standing_fault_says_in_readiness_why_the_worker_is_not_ready() -> None:
    health = Health()

    assert retries(health).note(standing()) is Disposition.STANDING

    ok, why = health.ready()
    assert not ok
    assert why == "database unreachable: standing fault: InvalidPasswordError"


def test_a_broker_failure_leaves_the_database_reachable() -> None:
    health = Health()
    health.database_ok = True

    retries(health).note(KafkaConnectionError())

    assert health.database_ok
    assert health.not_ready_because == "retrying after KafkaConnectionError"


def test_each_failed_try_is_counted_against_its_target() -> None:
    r = retries()
    before = retries_counted("database"), retries_counted("kafka")

    r.note(transient())
    r.note(KafkaConnectionError())
    r.note(transient(), "kafka")

    assert (retries_counted("database"), retries_counted("kafka")) == (
        before[0] + 1,
        before[1] + 2,
    )


def test_a_standing_fault_is_retried_slowly() -> None:
    r = retries()

    assert r.delay_after(standing(), Backoff(cap_s=1.0)) >= STANDING_RETRY_MIN_S


def test_a_transient_failure_is_retried_after_the_backoff() -> None:
    r = retries()
    backoff = Backoff(cap_s=1.0)

    delays = [r.delay_after(transient(), backoff) for _ in range(10)]

    assert all(d <= 1.0 for d in delays)
    assert backoff.attempt == 10


def test_a_stored_write_clears_what_the_failures_held_back() -> None:
    health = Health()
    r = retries(health)
    r.note(transient())

    r.succeeded()

    assert health.database_ok
    assert health.not_ready_because is None


def test_a_long_error_is_cut_for_the_log_line() -> None:
    text = short_error(ValueError("x" * 1000))

    assert len(text) == 300
    assert text.startswith("ValueError: xxx")
    assert text.endswith("...")


def test_the_shutdown_budget_keeps_the_reserve_for_leaving_the_group() -> None:
    shutdown = Shutdown(timeout_s=CLOSE_RESERVE_S + 10)
    shutdown.request()

    assert 9 < shutdown.budget_s() <= 10


def test_a_shutdown_past_its_deadline_still_gets_a_moment() -> None:
    shutdown = Shutdown(timeout_s=0)
    shutdown.request()

    assert shutdown.budget_s() == pytest.approx(0.1)


async def test_a_wait_ends_when_a_shutdown_is_requested() -> None:
    shutdown = Shutdown(timeout_s=30)
    asyncio.get_running_loop().call_later(0.05, shutdown.request)
    started = time.monotonic()

    assert await shutdown.sleep(60)
    assert time.monotonic() - started < 30


async def test_a_wait_without_a_shutdown_lasts_its_delay() -> None:
    assert not await Shutdown(timeout_s=30).sleep(0.01)


async def test_a_retry_wait_gives_up_when_the_shutdown_deadline_nears() -> None:
    shutdown = Shutdown(timeout_s=CLOSE_RESERVE_S)
    shutdown.request()

    with pytest.raises(ShutdownRequested):
        await asyncio.wait_for(shutdown.sleep_before_retry(60), 30)


async def test_a_retry_wait_outlives_a_shutdown_with_time_to_spare() -> None:
    shutdown = Shutdown(timeout_s=60)
    shutdown.request()

    await shutdown.sleep_before_retry(0.01)
