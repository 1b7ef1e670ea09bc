"""The dead-letter circuit breaker, as a pure state machine."""

from __future__ import annotations

from ingest.pipeline.breaker import DeadLetterBreaker


def breaker(**kw: float) -> DeadLetterBreaker:
    opts = {
        "window": 100,
        "max_ratio": 0.5,
        "min_records": 50,
        "max_consecutive": 1000,
        "cooldown_s": 10.0,
    }
    opts.update(kw)
    return DeadLetterBreaker(**opts)  # type: ignore[arg-type]


def test_stays_closed_below_the_minimum_number_of_records() -> None:
    b = breaker()
    assert not b.record([True] * 49, now=0)
    assert not b.is_open


def test_opens_when_the_dead_share_passes_the_ratio() -> None:
    b = breaker()
    assert not b.record([False] * 30, now=0)
    assert b.record([True] * 40, now=1)
    assert b.is_open
    assert "40 of the last 70" in b.reason


def test_a_healthy_share_keeps_it_closed() -> None:
    b = breaker()
    for t in range(20):
        assert not b.record([True, False, False], now=t)


def test_old_batches_leave_the_window() -> None:
    b = breaker(window=60, min_records=50)
    b.record([True] * 40, now=0)
    b.record([False] * 60, now=1)  # pushes the dead batch out of the window
    assert not b.record([True] * 20, now=2)


def test_opens_on_a_run_of_consecutive_dead_letters() -> None:
    b = breaker(max_ratio=1.0, max_consecutive=10)
    b.record([False] * 100, now=0)
    assert b.record([False] + [True] * 10, now=1)
    assert "10 dead letters in a row" in b.reason


def test_closes_after_the_cooldown_not_before() -> None:
    b = breaker()
    b.record([True] * 60, now=100)
    assert not b.due_to_close(109.9)
    assert b.due_to_close(110)


def test_a_cooldown_of_zero_never_closes_by_itself() -> None:
    b = breaker(cooldown_s=0)
    b.record([True] * 60, now=0)
    assert not b.due_to_close(10**9)


def test_reset_closes_and_forgets_the_window() -> None:
    b = breaker()
    b.record([True] * 60, now=0)
    b.reset()
    assert not b.is_open
    assert not b.record([True] * 49, now=1)
    assert b.record([True], now=2)


def test_while_open_batches_are_not_counted() -> None:
    b = breaker()
    b.record([True] * 60, now=0)
    assert not b.record([True] * 1000, now=1)
