"""How the bench sets a drain against the database ceiling."""

from __future__ import annotations

from ingest.tools.bench.drains import Drain
from ingest.tools.bench.report import Result, Server, State, table


def _table(state_ceiling: float, drain: Drain) -> str:
    r = Result(events=1_000, batch=100)
    r.servers.append(Server("PostgreSQL", "15", [State("empty tables", state_ceiling, [drain])]))
    return table(r)


def test_a_drain_is_set_against_the_ceiling_around_it_and_against_the_best() -> None:
    d = Drain(1, 900.0, 1_000, 1.0, 20.0, [100.0], ceiling_eps=950.0)
    out = _table(1_200.0, d)
    assert "0.95 x db ceiling around it (950 ev/s), 0.75 x the best" in out


def test_a_drain_without_a_ceiling_of_its_own_is_set_against_the_states() -> None:
    d = Drain(1, 900.0, 1_000, 1.0, 20.0, [100.0])
    out = _table(1_200.0, d)
    assert "0.75 x db ceiling" in out
    assert "around it" not in out


def test_drains_run_more_than_once_add_their_median_and_range() -> None:
    runs = [
        Drain(1, eps, 1_000, 1.0, 20.0, [100.0], ceiling_eps=1_000.0, cpu_x_floor=x)
        for eps, x in ((850.0, 2.1), (970.0, 2.3), (910.0, 1.9))
    ]
    r = Result(events=1_000, batch=100)
    r.servers.append(Server("PostgreSQL", "15", [State("empty tables", 1_100.0, runs)]))
    out = table(r)
    assert "median of 3 drains, 1 process" in out
    assert "0.91 x db ceiling around it" in out
    assert "range 0.85-0.97; CPU 2.10 x floor (1.90-2.30)" in out


def test_a_single_drain_has_no_median_row() -> None:
    out = _table(1_200.0, Drain(1, 900.0, 1_000, 1.0, 20.0, [100.0], ceiling_eps=950.0))
    assert "median" not in out
