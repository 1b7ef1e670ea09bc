"""``ingest bench``: how fast the worker drains a backlog, next to the limits of the machine,
measured side by side in one run on the same broker and database server.

1. preload a topic with N realistic events;
2. database ceiling: the same outcome with the minimal database work (rows prepared in
   memory; per batch, in one transaction: COPY the new calls, COPY the events, one
   set-based UPDATE of the terminated calls);
3. read ceiling: a bare aiokafka consumer reading the topic;
4. the worker draining the backlog from a fresh group (first commit to zero lag), with the
   peak RSS of its process; 5. the same with two worker processes;
6. the worker at a fixed offered load, with freshness (commit time minus event time);
7. one table and a JSON file with the machine's description.

After every run that writes, the benchmark checks that each event is stored exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import orjson

from ingest.tools.bench.ceilings import database_ceiling, read_ceiling
from ingest.tools.bench.corpus import bench_database, create_topic, preload
from ingest.tools.bench.drains import drain, steady
from ingest.tools.bench.report import Result, machine, table
from ingest.tools.devbroker import broker_or_env


async def run(args: argparse.Namespace, bootstrap: str, broker: str) -> Result:
    """Every measurement in order; prints progress to stderr."""
    url = await bench_database(os.environ.get("BENCH_DATABASE_URL"))
    r = Result(events=args.events, batch=args.batch)
    r.machine = await machine(url, broker)
    topic = f"bench-{time.time_ns()}"
    await create_topic(bootstrap, topic)

    def say(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    say(f"preloading {args.events:,} events")
    t = time.perf_counter()
    ends = await preload(bootstrap, topic, args.events, args.seed)
    r.preload_s = time.perf_counter() - t
    say("database ceiling")
    r.db_ceiling_eps = await database_ceiling(url, args.events, args.seed, args.batch)
    say("read ceiling")
    r.read_ceiling_eps = await read_ceiling(bootstrap, topic, args.events)
    say("worker, one process")
    r.drain_1_eps, rss1 = await drain(url, bootstrap, topic, args.events, ends, 1)
    r.drain_1_peak_rss_mb = rss1[0]
    say("worker, two processes")
    r.drain_2_eps, r.drain_2_peak_rss_mb = await drain(url, bootstrap, topic, args.events, ends, 2)
    if args.steady_seconds > 0:
        say(f"steady load {args.steady_rate:,.0f} ev/s for {args.steady_seconds:.0f} s")
        r.steady_seconds = args.steady_seconds
        (r.steady_rate_eps, r.freshness_p50_s, r.freshness_p95_s, r.freshness_p99_s) = await steady(
            url, bootstrap, args.steady_rate, args.steady_seconds, args.seed + 1
        )
    return r


def main(argv: list[str] | None = None) -> int:
    """``ingest bench``."""
    p = argparse.ArgumentParser(prog="ingest bench", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=5_000, help="the worker's default batch size")
    p.add_argument("--steady-rate", type=float, default=5_000)
    p.add_argument("--steady-seconds", type=float, default=60)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output", type=Path, default=Path("bench-results/latest.json"))
    args = p.parse_args(argv)
    with broker_or_env() as (bootstrap, broker):
        result = asyncio.run(run(args, bootstrap, "tansu (in memory)" if broker else bootstrap))
    print(table(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps(asdict(result), option=orjson.OPT_INDENT_2) + b"\n")
    print(f"written {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
