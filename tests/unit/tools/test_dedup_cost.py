"""How the bench measures the dedup window's cost: alternating pairs of drains, window on
and off (pure: the drains are stand-ins that return given rates)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from ingest.service.settings import ConfigError
from ingest.tools.bench import dedup, main
from ingest.tools.bench.drains import Drain, _worker_env
from ingest.tools.bench.report import Result, Server, State, table


def _drain(eps: float) -> Drain:
    return Drain(1, eps, 1_000, 1.0, 20.0, [100.0])


def test_pairs_alternate_which_side_drains_first() -> None:
    assert [dedup.order(i) for i in range(4)] == [
        (True, False),
        (False, True),
        (True, False),
        (False, True),
    ]


async def test_each_side_drains_with_its_window_in_the_alternating_order() -> None:
    seen: list[str] = []

    async def drain(settings: Mapping[str, str]) -> Drain:
        seen.append(settings["INGEST_DEDUP_WINDOW"])
        return _drain(1_000.0 if settings["INGEST_DEDUP_WINDOW"] == "off" else 900.0)

    cost = await dedup.measure(drain, 3, "12 hours", lambda _: None)
    assert seen == ["12 hours", "off", "off", "12 hours", "12 hours", "off"]
    assert [d.eps for d in cost.on] == [900.0, 900.0, 900.0]
    assert [d.eps for d in cost.off] == [1_000.0, 1_000.0, 1_000.0]
    assert cost.on_over_off == pytest.approx(0.9)


def test_the_cost_is_the_summed_rate_on_over_the_summed_rate_off() -> None:
    on = [_drain(30_000.0), _drain(36_000.0)]
    off = [_drain(33_000.0), _drain(33_000.0)]
    assert dedup.on_over_off(on, off) == pytest.approx(1.0)
    assert dedup.on_over_off([], off) == 0.0


def test_a_sides_settings_reach_its_workers_over_the_benchs_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INGEST_DEDUP_WINDOW", "24 hours")
    off = dedup.worker_settings("24 hours", on=False)
    env = _worker_env("postgresql://db", "k:9092", "t", "g", 8000, off)
    assert env["INGEST_DEDUP_WINDOW"] == "off"
    env = _worker_env("postgresql://db", "k:9092", "t", "g", 8000)
    assert env["INGEST_DEDUP_WINDOW"] == "24 hours"


def test_the_window_measured_is_the_workers_default_when_the_environment_names_none() -> None:
    assert dedup.configured_window({}) == "24 hours"
    assert dedup.configured_window({"INGEST_DEDUP_WINDOW": "2 hours"}) == "2 hours"


@pytest.mark.parametrize("raw", ["off", "OFF", "soon"])
def test_the_window_measured_must_be_on_and_valid(raw: str) -> None:
    with pytest.raises(ConfigError, match="INGEST_DEDUP_WINDOW"):
        dedup.configured_window({"INGEST_DEDUP_WINDOW": raw})


def test_dedup_pairs_with_the_window_off_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INGEST_DEDUP_WINDOW", "off")
    assert main(["--dedup-pairs", "2", "--history-days", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("ingest bench: --dedup-pairs compares the dedup window on and off")


def test_dedup_pairs_without_history_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--dedup-pairs", "2"]) == 2
    assert capsys.readouterr().err == (
        "ingest bench: --dedup-pairs measures on the history: give --history-days\n"
    )


def test_the_table_gives_the_ratio_and_each_pair_in_the_order_it_ran() -> None:
    cost = dedup.DedupCost(
        "24 hours",
        on=[_drain(35_000.0), _drain(34_000.0)],
        off=[_drain(36_000.0), _drain(33_000.0)],
    )
    cost.on_over_off = dedup.on_over_off(cost.on, cost.off)
    r = Result(events=1_000, batch=100)
    state = State("365 days of history", 30_000.0, [_drain(31_000.0)], dedup=cost)
    r.servers.append(Server("PostgreSQL", "15", [state]))
    out = table(r)
    assert "dedup window 24 hours on / off" in out
    assert "1.00 x" in out
    assert "2 pair(s), ev/s: on 35,000, off 36,000; off 33,000, on 34,000" in out


def _timed(write_s: float, look_back_s: float) -> Drain:
    return Drain(1, 30_000.0, 1_000, 1.0, 20.0, [100.0], write_s=write_s, look_back_s=look_back_s)


def test_the_look_back_share_is_the_summed_look_back_over_the_summed_write_time() -> None:
    on = [_timed(8.0, 0.1), _timed(12.0, 0.3)]
    assert dedup.look_back_share(on) == pytest.approx(0.02)
    assert dedup.look_back_share([_timed(0.0, 0.0)]) == 0.0


async def test_the_look_back_share_is_taken_from_the_window_on_drains_only() -> None:
    async def drain(settings: Mapping[str, str]) -> Drain:
        on = settings["INGEST_DEDUP_WINDOW"] != "off"
        return _timed(10.0, 0.5 if on else 0.0)

    cost = await dedup.measure(drain, 2, "24 hours", lambda _: None)
    assert cost.look_back_share == pytest.approx(0.05)


def test_the_table_gives_the_look_back_share_under_the_ratio() -> None:
    cost = dedup.DedupCost("24 hours", on=[_timed(10.0, 0.25)], off=[_timed(10.0, 0.0)])
    cost.look_back_share = dedup.look_back_share(cost.on)
    r = Result(events=1_000, batch=100)
    r.servers.append(Server("PostgreSQL", "15", [State("365 days", 30_000.0, [], dedup=cost)]))
    lines = table(r).splitlines()
    at = next(i for i, line in enumerate(lines) if "dedup window 24 hours on / off" in line)
    assert "look-back, window on" in lines[at + 1]
    assert "2.5%" in lines[at + 1]
    assert "of the workers' time storing batches" in lines[at + 1]
