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
