"""``ingest bench``: how fast the worker drains a backlog, next to the limits of the machine,
measured side by side in one run on the same broker, on PostgreSQL and on TimescaleDB.

1. preload a topic with N realistic events; read ceiling: a bare aiokafka consumer; the
   Python floor: CPU per record of a bare Python reader (read, decode, parse the envelope),
   which each drain's CPU per event is given as a multiple of;
2. per database server (PostgreSQL: BENCH_DATABASE_URL or a fresh local database;
   TimescaleDB: --timescaledb-url or TIMESCALEDB_URL), on empty tables: the database ceiling
   (the same outcome with the minimal database work: rows prepared in memory; per batch, in
   one transaction: COPY the new calls, COPY the events, one set-based UPDATE of the
   terminated calls), the worker draining the backlog from a fresh group with one and two
   processes (first commit to zero lag; CPU per event and peak RSS of its processes); one
   more ceiling run follows each drain, and each drain is set against the mean of the
   ceiling runs on either side of it, as against the floor measured around it;
3. with --history-days N, the same on a database holding N days of history before the
   corpus (generated server-side, kept between runs): the shipped queries
   (schema/queries/*.sql, median of several runs), the ceiling, one worker; on TimescaleDB
   also with the chunks older than 7 days compressed, and the compression figures; with
   --dedup-pairs K, on each history state K alternating pairs of one-process drains with the
   dedup window as configured and with it off (``dedup.py``);
4. on empty tables, the CPU ladder (``ladder.py``): the same records read again in this
   process, each rung doing more of the worker's work, each as a multiple of the floor;
5. on the first server (PostgreSQL), the worker at a fixed offered load, with freshness
   (commit time minus event time);
6. one table and a JSON file with the machine's description.

``--rolling`` measures something else instead: a rolling restart of worker replicas under
a steady load (see ``rolling.py``).
With --soak-minutes N, only a soak instead, per server: one worker at --soak-rate for N
minutes, its RSS through the run and the freshness of the first and the last fifth,
measured from outside (see ``soak``).

After every run that writes, the benchmark checks that each event of the corpus is stored
exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from ingest.service.settings import ConfigError
from ingest.tools.bench import dedup
from ingest.tools.bench.ceilings import database_ceiling, read_ceiling
from ingest.tools.bench.corpus import (
    REPEAT_LAG,
    START,
    Target,
    bench_database,
    clean,
    create_topic,
    drop_database,
    preload,
    server_version,
    unreachable,
)
from ingest.tools.bench.drains import Drain, drain, steady
from ingest.tools.bench.floor import floor_around, python_floor, with_floor_ratios
from ingest.tools.bench.history import (
    Shape,
    compress,
    compressed_state,
    compression_stats,
    decompress,
    history_database,
    size_bytes,
)
from ingest.tools.bench.ladder import cpu_ladder
from ingest.tools.bench.queries import query_files, time_queries
from ingest.tools.bench.report import (
    CompressionFigures,
    HistoryFigures,
    Result,
    Server,
    State,
    Steady,
    machine,
    table,
)
from ingest.tools.bench.rolling import describe, rolling
from ingest.tools.bench.soak import soak
from ingest.tools.devbroker import LOCAL_ADMIN_URL, broker_or_env
from ingest.tools.migrate import schema_dir

_STARTED = time.monotonic()


def _say(msg: str) -> None:
    print(f"[bench {time.monotonic() - _STARTED:5.0f}s] {msg}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace, bootstrap: str, broker: str) -> Result:
    """Every measurement in order; prints progress to stderr."""
    r = Result(events=args.events, batch=args.batch)
    r.machine = await machine(broker)
    servers: list[tuple[str, str | None]] = []
    if not args.timescaledb_only:
        pg = os.environ.get("BENCH_DATABASE_URL")
        servers.append((pg or LOCAL_ADMIN_URL, pg))
    tsdb = args.timescaledb_url or os.environ.get("TIMESCALEDB_URL")
    if tsdb:
        reason = await unreachable(tsdb)
        if reason:
            r.skipped.append(f"TimescaleDB: {reason}")
        else:
            servers.append((tsdb, None))
    else:
        r.skipped.append("TimescaleDB: no --timescaledb-url and no TIMESCALEDB_URL")
    for reason in r.skipped:
        _say(f"skipped: {reason}")
    if args.soak_minutes > 0:
        r.events, r.batch = 0, 0
        for server_url, db_url in servers:
            await _soak(args, server_url, db_url, r)
        return r

    topic = f"bench-{time.time_ns()}"
    await create_topic(bootstrap, topic)
    _say(f"preloading {args.events:,} events")
    t = time.perf_counter()
    ends, r.repeats = await preload(bootstrap, topic, args.events, args.seed, args.repeat_every)
    r.preload_s = time.perf_counter() - t
    _say("read ceiling")
    r.read_ceiling_eps = await read_ceiling(bootstrap, topic, args.events)
    _say("Python floor")
    r.floor_us_per_record = await python_floor(bootstrap, topic, args.events)
    corpus = Corpus(bootstrap, topic, ends)
    for i, (server_url, db_url) in enumerate(servers):
        srv = Server(*await server_version(server_url))
        r.servers.append(srv)
        try:
            await _server(args, corpus, srv, server_url, db_url, steady_load=i == 0)
        except (OSError, asyncpg.PostgresError) as exc:
            # The rows measured so far are kept; the reason goes with them.
            r.skipped.append(f"{srv.name}: the rest failed: {type(exc).__name__}: {exc}")
            _say(r.skipped[-1])
    with_floor_ratios(r)
    return r


async def _soak(args: argparse.Namespace, server_url: str, db_url: str | None, r: Result) -> None:
    """The soak on one server, in a database of its own (or BENCH_DATABASE_URL's), and with
    a broker of its own unless KAFKA_BOOTSTRAP_SERVERS names one: an in-memory Tansu slows
    down as it fills, so the second server's soak would start on the first one's records."""
    srv = Server(*await server_version(server_url))
    r.servers.append(srv)
    _say(f"{srv.name} {srv.version}: soak, {args.soak_rate:,.0f} ev/s for {args.soak_minutes} min")
    url, created = await bench_database(db_url, server_url)
    try:
        with broker_or_env() as (bootstrap, broker):
            pid = broker.process.pid if broker is not None and broker.process else None
            srv.soak = await soak(
                Target(url), bootstrap, args.soak_rate, args.soak_minutes * 60, args.seed + 2, pid
            )
    except (OSError, asyncpg.PostgresError) as exc:
        r.skipped.append(f"{srv.name}: the soak failed: {type(exc).__name__}: {exc}")
        _say(r.skipped[-1])
    finally:
        if created:
            await drop_database(server_url, url)


@dataclass(frozen=True, slots=True)
class Corpus:
    """The preloaded topic every drain reads."""

    bootstrap: str
    topic: str
    ends: dict[int, int]


async def _server(
    args: argparse.Namespace,
    corpus: Corpus,
    srv: Server,
    server_url: str,
    db_url: str | None,
    steady_load: bool,
) -> None:
    """Empty tables, then history (plain, then compressed on TimescaleDB), on one server."""
    _say(f"{srv.name} {srv.version}")
    url, created = await bench_database(db_url, server_url)
    try:
        empty = State("empty tables")
        srv.states.append(empty)
        await _measure(args, corpus, Target(url), empty, args.processes, queries=False)
        if args.ladder:
            _say(f"{empty.name}: CPU ladder")
            srv.ladder = await cpu_ladder(
                Target(url), corpus.bootstrap, corpus.topic, args.events, args.batch
            )
        if steady_load and args.steady_seconds > 0:
            _say(f"steady load {args.steady_rate:,.0f} ev/s for {args.steady_seconds:.0f} s")
            rate, p50, p95, p99 = await steady(
                Target(url), corpus.bootstrap, args.steady_rate, args.steady_seconds, args.seed + 1
            )
            srv.steady = Steady(args.steady_seconds, rate, p50, p95, p99)
    finally:
        if created:
            await drop_database(server_url, url)
    if args.history_days > 0:
        await _history(args, corpus, server_url, srv)


async def _history(args: argparse.Namespace, corpus: Corpus, server_url: str, srv: Server) -> None:
    shape = Shape(args.history_days, args.history_calls_per_day, START)
    async with history_database(server_url, shape, _say) as h:
        srv.history = HistoryFigures(
            h.shape.days, h.shape.calls_per_day, h.calls, h.events, h.reused, h.generated_s
        )
        target = Target(h.url, history=True)
        plain = State(f"{shape.days} days of history")
        if not h.timescaledb:
            srv.states.append(plain)
            await _measure(args, corpus, target, plain, processes=(1,), queries=True)
            return
        packed = State(f"{shape.days} days of history, chunks older than 7 days compressed")
        srv.states += [plain, packed]
        # One transition per run: measure the state the cached history is in first.
        if await compressed_state(h.url, START):
            after = await size_bytes(h.url)
            stats = await compression_stats(h.url)
            await _measure(args, corpus, target, packed, processes=(1,), queries=True)
            _say("decompressing the history")
            chunks, took = await decompress(h.url)
            before = await size_bytes(h.url)
            transition = "decompressing"
            await _measure(args, corpus, target, plain, processes=(1,), queries=True)
        else:
            await _measure(args, corpus, target, plain, processes=(1,), queries=True)
            before = await size_bytes(h.url)
            _say("compressing the chunks older than 7 days")
            chunks, took = await compress(h.url, START)
            after = await size_bytes(h.url)
            stats = await compression_stats(h.url)
            transition = "compressing"
            await _measure(args, corpus, target, packed, processes=(1,), queries=True)
        srv.compression = CompressionFigures(
            chunks,
            before,
            after,
            int(stats.get("before_compression_total_bytes") or 0),
            int(stats.get("after_compression_total_bytes") or 0),
            transition,
            took,
        )


async def _measure(
    args: argparse.Namespace,
    corpus: Corpus,
    target: Target,
    st: State,
    processes: tuple[int, ...],
    queries: bool,
) -> None:
    """The shipped queries (on the history alone), the ceiling, then the drains."""
    if queries:
        await clean(target)
        files = query_files(args.queries)
        _say(f"{st.name}: {len(files)} query file(s) x {args.query_runs} runs")
        st.queries = await time_queries(target.url, args.queries, args.query_runs)

    async def ceiling() -> float:
        eps = await database_ceiling(target, args.events, args.seed, args.batch)
        st.ceiling_eps = max(st.ceiling_eps, eps)
        return eps

    _say(f"{st.name}: database ceiling, best of {args.ceiling_runs}")
    before = 0.0
    for _ in range(args.ceiling_runs):
        before = await ceiling()

    def drain_with(processes: int) -> Callable[..., Awaitable[Drain]]:
        return functools.partial(
            drain,
            target,
            corpus.bootstrap,
            corpus.topic,
            args.events,
            corpus.ends,
            processes,
            args.drain_timeout,
        )

    for n in [count for count in processes for _ in range(args.drain_runs)]:
        _say(f"{st.name}: worker, {n} process(es)")
        d = await floor_around(corpus.bootstrap, corpus.topic, args.events, drain_with(n))
        # A ceiling run on each side of every drain, as for the floor: the machine's speed
        # drifts by a third within minutes, so a drain is set against the ceiling of its
        # own minutes, not only against the fastest run of the state.
        _say(f"{st.name}: database ceiling after the drain")
        after = await ceiling()
        d.ceiling_eps = (before + after) / 2
        before = after
        st.drains.append(d)
    if target.history and args.dedup_pairs > 0:
        st.dedup = await dedup.measure(
            drain_with(1),
            args.dedup_pairs,
            args.dedup_window,
            lambda msg: _say(f"{st.name}: {msg}"),
        )
    await clean(target)


def _whole_number(least: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            n = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError("a whole number") from None
        if n < least:
            raise argparse.ArgumentTypeError(f"at least {least}")
        return n

    return parse


_at_least_one = _whole_number(1)
_none_or_more = _whole_number(0)


def _positive_minutes(raw: str) -> float:
    try:
        minutes = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError("a number of minutes") from None
    if not minutes > 0:
        raise argparse.ArgumentTypeError("more than 0")
    return minutes


def _process_counts(raw: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in raw.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of counts, e.g. 1,2") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("counts of at least 1")
    return counts


def parser() -> argparse.ArgumentParser:
    """The options of ``ingest bench``."""
    p = argparse.ArgumentParser(prog="ingest bench", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=5_000, help="the worker's default batch size")
    p.add_argument("--steady-rate", type=float, default=5_000)
    p.add_argument("--steady-seconds", type=float, default=60)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--repeat-every",
        type=int,
        default=0,
        help=f"after every K-th event, publish again one published {REPEAT_LAG:,} events before "
        "it (a producer's retry: the drains store batches holding stored keys); default 0: none",
    )
    p.add_argument(
        "--history-days",
        type=int,
        default=0,
        help="also measure with this many days of history before the corpus (365: a year)",
    )
    p.add_argument("--history-calls-per-day", type=int, default=2_000)
    p.add_argument(
        "--timescaledb-url",
        help="a TimescaleDB server to measure too (default: TIMESCALEDB_URL)",
    )
    p.add_argument(
        "--timescaledb-only",
        action="store_true",
        help="measure the TimescaleDB server only (the steady load then runs there)",
    )
    p.add_argument(
        "--queries",
        type=Path,
        default=None,
        help="directory of query files to time (default: schema/queries)",
    )
    p.add_argument(
        "--processes",
        type=_process_counts,
        default=(1, 2),
        help="worker processes per drain on empty tables, comma-separated (default 1,2)",
    )
    p.add_argument(
        "--ladder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on empty tables, where the CPU per event above the floor goes: the same records "
        "read again in the bench's process, each rung doing more of the worker's work "
        "(default on)",
    )
    p.add_argument("--query-runs", type=int, default=5, help="runs per query file (median)")
    p.add_argument(
        "--ceiling-runs",
        type=_at_least_one,
        default=2,
        help="runs of each database ceiling before the drains, one more after each drain; "
        "a drain is set against the runs on either side of it (default 2)",
    )
    p.add_argument(
        "--drain-runs",
        type=_at_least_one,
        default=1,
        help="drains of each process count per state, each with a ceiling run after it; with "
        "more than one, the table adds their median and range (default 1)",
    )
    p.add_argument(
        "--dedup-pairs",
        type=_none_or_more,
        default=0,
        help="on each history state, this many pairs of one-process drains with the dedup "
        "window as configured (INGEST_DEDUP_WINDOW, default 24 hours) and with it off, in "
        "alternating order: the window's cost (default 0: not measured)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=1800,
        help="seconds before a drain is cut short (its row then says so)",
    )
    p.add_argument(
        "--rolling",
        action="store_true",
        help="only a rolling restart of --rolling-replicas workers at --rolling-rate ev/s",
    )
    p.add_argument("--rolling-rate", type=float, default=3_000)
    p.add_argument("--rolling-replicas", type=_at_least_one, default=3)
    p.add_argument(
        "--rolling-membership",
        choices=("static", "dynamic"),
        default="static",
        help="static: each replica keeps its KAFKA_GROUP_INSTANCE_ID across its restart",
    )
    p.add_argument(
        "--soak-minutes",
        type=_positive_minutes,
        default=0.0,
        help="only a soak instead: one worker at --soak-rate for this many minutes, per server",
    )
    p.add_argument(
        "--soak-rate", type=float, default=3_000, help="events/s offered in a soak (default 3000)"
    )
    p.add_argument("--output", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    """``ingest bench``."""
    args = parser().parse_args(argv)
    if args.rolling:
        return _rolling(args)
    args.dedup_window = ""
    if args.dedup_pairs > 0:
        try:
            if args.history_days <= 0:
                raise ConfigError("--dedup-pairs measures on the history: give --history-days")
            args.dedup_window = dedup.configured_window(os.environ)
        except ConfigError as exc:
            print(f"ingest bench: {exc}", file=sys.stderr)
            return 2
    args.output = args.output or Path("bench-results/latest.json")
    if args.queries is None:
        args.queries = schema_dir() / "queries"
    with broker_or_env() as (bootstrap, broker):
        result = asyncio.run(run(args, bootstrap, "tansu (in memory)" if broker else bootstrap))
    print(table(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps(asdict(result), option=orjson.OPT_INDENT_2) + b"\n")
    print(f"written {args.output}", file=sys.stderr)
    return 0


def _rolling(args: argparse.Namespace) -> int:
    pg = os.environ.get("BENCH_DATABASE_URL")
    with broker_or_env() as (bootstrap, _broker):
        result = asyncio.run(_rolling_run(args, bootstrap, pg))
    print(describe(result))
    output = args.output or Path(f"bench-results/rolling-{result.membership}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(asdict(result), option=orjson.OPT_INDENT_2) + b"\n")
    print(f"written {output}", file=sys.stderr)
    return 0 if result.exact else 1


async def _rolling_run(args: argparse.Namespace, bootstrap: str, pg: str | None) -> Any:
    url, created = await bench_database(pg, pg or LOCAL_ADMIN_URL)
    try:
        return await rolling(
            Target(url),
            bootstrap,
            args.rolling_rate,
            args.rolling_replicas,
            static=args.rolling_membership == "static",
            seed=args.seed + 2,
            say=_say,
        )
    finally:
        if created:
            await drop_database(LOCAL_ADMIN_URL, url)


if __name__ == "__main__":
    raise SystemExit(main())
