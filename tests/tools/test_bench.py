"""``ingest bench`` end to end with tiny numbers, so the command cannot rot: one run of the
real command (real broker, real worker processes, real servers) on PostgreSQL, and on
TimescaleDB when one is reachable (``TIMESCALEDB_URL`` or 127.0.0.1:5433)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import pytest_asyncio

from ingest.service.settings import redact_url
from ingest.tools.bench.corpus import START
from ingest.tools.bench.queries import run_times
from tests.conftest import TEST_DATABASE_URL, _with_db

# Enough batches of 500 that a drain spans several of the bench's 50 ms polls.
EVENTS = 12_000
# More than 7 days, so that TimescaleDB has chunks old enough to compress.
# A copy of an earlier event after every 1,000th (from the 6,001st on: half the corpus back).
REPEAT_EVERY = 1_000
HISTORY_DAYS = 9
CALLS_PER_DAY = 50
TIMESCALEDB_URL = os.environ.get("TIMESCALEDB_URL", "postgresql://postgres@127.0.0.1:5433/postgres")


async def _timescaledb() -> str | None:
    """The TimescaleDB server's URL, or None when nothing answers there."""
    try:
        conn = await asyncpg.connect(TIMESCALEDB_URL, timeout=3)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return None
    try:
        has = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')"
        )
    finally:
        await conn.close()
    return TIMESCALEDB_URL if has else None


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def bench(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """One run of ``ingest bench`` with tiny numbers; yields its JSON result."""
    name = f"ingest_test_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(TEST_DATABASE_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    tmp = tmp_path_factory.mktemp("bench")
    queries = tmp / "queries"
    queries.mkdir()
    (queries / "calls_per_status.sql").write_text(
        "SELECT status, count(*) FROM calls GROUP BY 1;\n\\echo done\n"
    )
    tsdb = await _timescaledb()
    args = [
        sys.executable, "-m", "ingest", "bench",
        "--events", str(EVENTS), "--batch", "500", "--steady-seconds", "0", "--processes", "1",
        "--history-days", str(HISTORY_DAYS), "--history-calls-per-day", str(CALLS_PER_DAY),
        "--queries", str(queries), "--query-runs", "2", "--drain-timeout", "60",
        "--repeat-every", str(REPEAT_EVERY), "--drain-runs", "2", "--dedup-pairs", "1",
        "--output", str(tmp / "latest.json"),
    ]  # fmt: skip
    if tsdb is not None:
        args += ["--timescaledb-url", tsdb]
    env = {
        **os.environ,
        "BENCH_DATABASE_URL": _with_db(TEST_DATABASE_URL, name),
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        # Tansu answers a join after about two thirds of the session timeout, and the run
        # starts a worker for every drain, one after the other: keep it short.
        "KAFKA_SESSION_TIMEOUT_MS": "2000",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "500",
    }
    env.pop("TIMESCALEDB_URL", None)
    env.pop("INGEST_DEDUP_WINDOW", None)
    try:
        proc = await asyncio.to_thread(
            subprocess.run, args, env=env, capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield {"result": orjson.loads((tmp / "latest.json").read_bytes()), "table": proc.stdout}
    finally:
        admin = await asyncpg.connect(TEST_DATABASE_URL)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# A soak short enough for the suite: each fifth holds a few seconds and a few batches.
SOAK_MINUTES = 0.25
SOAK_RATE = 400


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def soak(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """One run of ``ingest bench --soak-minutes`` with tiny numbers; yields its JSON result."""
    name = f"ingest_test_soak_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(TEST_DATABASE_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    out = tmp_path_factory.mktemp("soak") / "latest.json"
    args = [
        sys.executable, "-m", "ingest", "bench",
        "--soak-minutes", str(SOAK_MINUTES), "--soak-rate", str(SOAK_RATE), "--output", str(out),
    ]  # fmt: skip
    tsdb = await _timescaledb()
    if tsdb is not None:
        args += ["--timescaledb-url", tsdb]
    env = {
        **os.environ,
        "BENCH_DATABASE_URL": _with_db(TEST_DATABASE_URL, name),
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "KAFKA_SESSION_TIMEOUT_MS": "3000",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "500",
    }
    env.pop("TIMESCALEDB_URL", None)
    try:
        proc = await asyncio.to_thread(
            subprocess.run, args, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield {"result": orjson.loads(out.read_bytes()), "table": proc.stdout}
    finally:
        admin = await asyncpg.connect(TEST_DATABASE_URL)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def _soak_is_whole(s: Any) -> None:
    """What a soak reports, on any server, whatever the machine's speed."""
    assert s["exact"], s
    assert s["events"] == s["stored_rows"] == s["stored_ids"] > 0
    assert s["seconds"] == SOAK_MINUTES * 60
    assert s["rss_mb"]
    assert all(mb > 0 for mb in s["rss_mb"])
    assert s["rss_growth_mb"] == pytest.approx(s["rss_end_mb"] - s["rss_after_warmup_mb"])
    assert s["rss_noise_mb"] >= 0
    assert s["warmup_s"] == s["seconds"] / 5
    assert len(s["fifths"]) == 5
    assert sum(f["events"] for f in s["fifths"]) == s["events"]
    for f in s["fifths"]:
        assert f["events"] > 0
        assert 0 < f["freshness_p50_s"] <= f["freshness_p99_s"] <= f["freshness_max_s"]
        # The shares are each event's own parts of its freshness.
        assert 0 <= f["broker_p99_s"] <= f["freshness_max_s"]
        assert 0 < f["worker_p99_s"] <= f["freshness_max_s"]
        assert f["write_mean_ms"] > 0
        assert f["batch_mean_events"] > 0
        assert f["worker_cpu_us_per_event"] > 0
        assert f["bench_cpu_us_per_event"] > 0
        # The broker is the test's, not one the bench started: its CPU is not the bench's to read.
        assert f["broker_cpu_us_per_event"] is None
    first, last = s["fifths"][0], s["fifths"][-1]
    assert s["p99_ratio"] == pytest.approx(last["freshness_p99_s"] / first["freshness_p99_s"])
    assert s["worker_p99_ratio"] == pytest.approx(last["worker_p99_s"] / first["worker_p99_s"])
    tables = {t["name"]: t for t in s["tables"]}
    assert set(tables) == {"call_events", "calls", "ingest_consumer_offsets"}
    assert all(t["total_bytes"] > 0 for t in tables.values())
    # The positions are advanced once per batch: updated rows, never new ones.
    assert tables["ingest_consumer_offsets"]["updates"] > 0


async def test_soak_reports_rss_freshness_by_fifth_and_exactness_on_postgresql(soak: Any) -> None:
    pg = _server(soak["result"], "PostgreSQL")
    _soak_is_whole(pg["soak"])
    assert pg["states"] == []
    assert "freshness p99, first -> last fifth" in soak["table"]
    assert "RSS every" in soak["table"]


async def test_soak_adds_up_timescaledb_chunks_in_its_table_figures(soak: Any) -> None:
    ts = _server(soak["result"], "TimescaleDB")
    _soak_is_whole(ts["soak"])
    events = {t["name"]: t for t in ts["soak"]["tables"]}["call_events"]
    # call_events itself holds no rows on TimescaleDB: its chunks do.
    assert events["total_bytes"] > 0


def test_soak_minutes_must_be_positive() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ingest", "bench", "--soak-minutes", "0"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    assert proc.returncode == 2
    assert "--soak-minutes: more than 0" in proc.stderr


def _server(result: Any, name: str) -> Any:
    found = [s for s in result["servers"] if s["name"] == name]
    if not found and name == "TimescaleDB":
        pytest.skip(
            f"no TimescaleDB server answers at {redact_url(TIMESCALEDB_URL)} "
            "(set TIMESCALEDB_URL to one)"
        )
    assert found, result["skipped"]
    return found[0]


def _drains_are_whole(state: Any) -> None:
    assert state["ceiling_eps"] > 0
    for d in state["drains"]:
        assert d["finished"], d
        assert d["eps"] > 0
        assert d["cpu_us_per_event"] > 0
        assert all(rss > 0 for rss in d["peak_rss_mb"])
        # The mean of the ceiling runs on either side of it: at most the fastest of them.
        assert 0 < d["ceiling_eps"] <= state["ceiling_eps"]


async def test_bench_measures_postgresql_empty_and_with_history(bench: Any) -> None:
    pg = _server(bench["result"], "PostgreSQL")
    empty, history = pg["states"]
    # --drain-runs 2: each state's drain twice, each with a ceiling run of its own after it.
    assert [d["processes"] for d in empty["drains"]] == [1, 1]
    assert [d["processes"] for d in history["drains"]] == [1, 1]
    _drains_are_whole(empty)
    _drains_are_whole(history)
    assert pg["history"]["days"] == HISTORY_DAYS
    assert pg["history"]["calls"] == HISTORY_DAYS * CALLS_PER_DAY
    # About 6 events a call.
    assert 5 * pg["history"]["calls"] < pg["history"]["events"] < 7 * pg["history"]["calls"]
    assert "worker, 1 process" in bench["table"]
    assert "median of 2 drains, 1 process" in bench["table"]


def _dedup_pair_is_whole(state: Any) -> None:
    cost = state["dedup"]
    assert cost["window"] == "24 hours"
    assert len(cost["on"]) == len(cost["off"]) == 1
    for d in cost["on"] + cost["off"]:
        assert d["finished"], d
        assert d["eps"] > 0
        assert d["write_s"] > 0
    assert cost["on_over_off"] == pytest.approx(cost["on"][0]["eps"] / cost["off"][0]["eps"])
    # Batches of 500 from 50 calls at a time: some hold events of calls stored before them,
    # which the window on asks about and the window off does not.
    on, off = cost["on"][0], cost["off"][0]
    assert 0 < on["look_back_s"] < on["write_s"]
    assert off["look_back_s"] == 0
    assert cost["look_back_share"] == pytest.approx(on["look_back_s"] / on["write_s"])


async def test_bench_measures_the_dedup_windows_cost_on_the_postgresql_history(
    bench: Any,
) -> None:
    empty, history = _server(bench["result"], "PostgreSQL")["states"]
    assert empty["dedup"] is None
    _dedup_pair_is_whole(history)
    assert "dedup window 24 hours on / off" in bench["table"]
    assert "look-back, window on" in bench["table"]


async def test_bench_measures_the_dedup_windows_cost_on_both_timescaledb_histories(
    bench: Any,
) -> None:
    empty, plain, packed = _server(bench["result"], "TimescaleDB")["states"]
    assert empty["dedup"] is None
    _dedup_pair_is_whole(plain)
    _dedup_pair_is_whole(packed)


async def test_bench_publishes_repeats_that_every_drain_stores_once(bench: Any) -> None:
    # The bench fails a drain that stored a copy (it counts rows and ids of the corpus).
    assert bench["result"]["repeats"] == 6
    assert "repeats" in bench["table"]
    for state in _server(bench["result"], "PostgreSQL")["states"]:
        _drains_are_whole(state)


async def test_bench_gives_each_drains_cpu_as_a_multiple_of_the_floor_measured_around_it(
    bench: Any,
) -> None:
    result = bench["result"]
    assert result["floor_us_per_record"] > 0
    drains = [d for s in _server(result, "PostgreSQL")["states"] for d in s["drains"]]
    assert drains
    for d in drains:
        assert d["floor_us"] > 0
        assert d["cpu_x_floor"] == pytest.approx(d["cpu_us_per_event"] / d["floor_us"])
    assert "Python floor" in bench["table"]
    first = drains[0]
    assert f"{first['cpu_x_floor']:.2f} x floor ({first['floor_us']:.1f} us)" in bench["table"]


async def test_bench_climbs_the_cpu_ladder_from_the_floor_on_empty_tables(bench: Any) -> None:
    ladder = _server(bench["result"], "PostgreSQL")["ladder"]
    assert ladder["records"] == EVENTS
    rungs = ladder["rungs"]
    assert [r["name"] for r in rungs] == [
        "floor: read, parse",
        "read, parse, COPY",
        "read, decode, COPY",
        "read, decode, sink",
    ]
    assert rungs[0]["us_per_record"] == ladder["floor_us"] > 0
    for r in rungs:
        assert r["x_floor"] == pytest.approx(r["us_per_record"] / ladder["floor_us"])
    # The top rung does all the floor does and the worker's decoding and writes besides.
    assert rungs[-1]["us_per_record"] > rungs[0]["us_per_record"]
    assert "CPU ladder" in bench["table"]


async def test_bench_times_each_query_file_on_the_history(bench: Any) -> None:
    pg = _server(bench["result"], "PostgreSQL")
    (q,) = pg["states"][1]["queries"]
    assert q["file"] == "calls_per_status.sql"
    assert q["error"] == ""
    assert len(q["runs_ms"]) == 2
    assert q["median_ms"] > 0


async def test_bench_leaves_the_history_as_it_found_it(bench: Any) -> None:
    pg = _server(bench["result"], "PostgreSQL")
    url = _with_db(TEST_DATABASE_URL, f"ingest_bench_history_{HISTORY_DAYS}d_{CALLS_PER_DAY}c")
    conn = await asyncpg.connect(url)
    try:
        events = await conn.fetchval("SELECT count(*) FROM call_events")
        calls = await conn.fetchval("SELECT count(*) FROM calls")
        positions = await conn.fetchval("SELECT count(*) FROM ingest_consumer_offsets")
    finally:
        await conn.close()
    assert (events, calls, positions) == (pg["history"]["events"], pg["history"]["calls"], 0)


async def test_bench_leaves_no_dead_rows_of_its_runs_in_a_postgresql_history(bench: Any) -> None:
    _server(bench["result"], "PostgreSQL")
    url = _with_db(TEST_DATABASE_URL, f"ingest_bench_history_{HISTORY_DAYS}d_{CALLS_PER_DAY}c")
    conn = await asyncpg.connect(url)
    try:
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgstattuple')"
        ):
            pytest.skip("the server has no pgstattuple extension to count dead rows with")
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        try:
            dead = await conn.fetchval("SELECT dead_tuple_count FROM pgstattuple('call_events')")
        finally:
            await conn.execute("DROP EXTENSION pgstattuple")
    finally:
        await conn.close()
    assert dead == 0


async def test_bench_leaves_no_chunk_of_its_runs_in_a_timescaledb_history(bench: Any) -> None:
    _server(bench["result"], "TimescaleDB")
    url = _with_db(TIMESCALEDB_URL, f"ingest_bench_history_{HISTORY_DAYS}d_{CALLS_PER_DAY}c")
    conn = await asyncpg.connect(url)
    try:
        newest = await conn.fetchval(
            "SELECT max(range_end) FROM timescaledb_information.chunks "
            "WHERE hypertable_name = 'call_events'"
        )
    finally:
        await conn.close()
    assert newest <= START


async def test_bench_measures_timescaledb_plain_and_compressed_history(bench: Any) -> None:
    ts = _server(bench["result"], "TimescaleDB")
    empty, plain, packed = ts["states"]
    for state in (empty, plain, packed):
        _drains_are_whole(state)
    assert "compressed" in packed["name"]
    assert len(packed["queries"]) == 1
    c = ts["compression"]
    assert c["chunks"] > 0
    assert c["size_before_bytes"] > 0
    assert c["size_after_bytes"] > 0


async def test_bench_leaves_no_job_scheduler_running_for_its_kept_timescaledb_history(
    bench: Any,
) -> None:
    _server(bench["result"], "TimescaleDB")
    conn = await asyncpg.connect(TIMESCALEDB_URL)
    try:
        schedulers = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = $1 AND backend_type = 'TimescaleDB Background Worker Scheduler'",
            f"ingest_bench_history_{HISTORY_DAYS}d_{CALLS_PER_DAY}c",
        )
    finally:
        await conn.close()
    assert schedulers == 0


def test_query_time_of_a_run_is_the_sum_of_its_statements() -> None:
    out = "@@ingest-bench-run\nTime: 1.5 ms\nTime: 2.5 ms\n@@ingest-bench-run\nTime: 3.0 ms\n"
    assert run_times(out) == [4.0, 3.0]


def test_query_run_times_read_long_psql_timings() -> None:
    assert run_times("@@ingest-bench-run\nTime: 1234.567 ms (00:01.235)\n") == [1234.567]


def test_bench_help_names_the_history_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ingest", "bench", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent,
    ).stdout
    assert "--history-days" in out
    assert "--timescaledb-url" in out
    assert "--rolling" in out
    assert "--soak-minutes" in out
