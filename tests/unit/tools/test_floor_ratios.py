"""How the bench turns a drain's CPU per event into a multiple of the Python floor."""

from __future__ import annotations

import pytest

from ingest.tools.bench.drains import Drain
from ingest.tools.bench.floor import with_floor_ratios
from ingest.tools.bench.report import Result, Server, State, table


def _result(run_floor: float, *drains: Drain) -> Result:
    r = Result(events=1_000, batch=100, floor_us_per_record=run_floor)
    r.servers.append(Server("PostgreSQL", "15", [State("empty tables", 1_000.0, list(drains))]))
    return r


def _drain(cpu_us: float, floor_us: float = 0.0) -> Drain:
    return Drain(1, 1_000.0, 1_000, 1.0, cpu_us, [100.0], floor_us=floor_us)


def test_a_drain_is_measured_against_the_floor_taken_around_it() -> None:
    d = _drain(20.0, floor_us=8.0)
    with_floor_ratios(_result(5.0, d))
    assert d.cpu_x_floor == pytest.approx(2.5)


def test_a_drain_without_a_floor_of_its_own_takes_the_runs() -> None:
    d = _drain(20.0)
    with_floor_ratios(_result(5.0, d))
    assert d.cpu_x_floor == pytest.approx(4.0)


def test_no_floor_at_all_gives_no_ratio() -> None:
    d = _drain(20.0)
    with_floor_ratios(_result(0.0, d))
    assert d.cpu_x_floor == 0.0


def test_the_table_names_the_floor_each_ratio_was_taken_against() -> None:
    d = _drain(20.0, floor_us=8.0)
    r = _result(5.0, d)
    with_floor_ratios(r)
    assert "20.0 us = 2.50 x floor (8.0 us)" in table(r)
