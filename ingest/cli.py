"""The ``ingest`` command: run, migrate, produce, dlq replay, positions, report, schema.

Exit codes: 0 done, 1 failed, 2 bad configuration or usage (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import orjson

from ingest import __version__
from ingest.pipeline.deadletter import REASONS
from ingest.service.settings import ConfigError, Settings, redact_url

if TYPE_CHECKING:
    from ingest.tools.migrate import Status

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ingest", description="Kafka call events -> PostgreSQL / TimescaleDB."
    )
    p.add_argument("--version", action="version", version=f"ingest {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="run the worker (configuration from the environment)")

    m = sub.add_parser("migrate", help="schema migrations")
    msub = m.add_subparsers(dest="verb", required=True)
    up = msub.add_parser("up", help="apply pending migrations")
    up.add_argument("--to", help="stop after this version")
    down = msub.add_parser("down", help="revert applied migrations, newest first")
    down.add_argument("--steps", type=int, default=1)
    msub.add_parser("status", help="applied and pending migrations; hypertable or not")
    create = msub.add_parser("create", help="write an empty migration file")
    create.add_argument("name")

    pr = sub.add_parser("produce", help="publish synthetic call events")
    pr.add_argument("--calls", type=int, default=1000)
    pr.add_argument("--rate", type=float, default=0.0, help="events/s; 0 = as fast as possible")
    pr.add_argument("--invalid-fraction", type=float, default=0.0)
    pr.add_argument("--topic", help="default: the first of KAFKA_TOPICS")
    pr.add_argument("--seed", type=int)

    dlq = sub.add_parser("dlq", help="dead-letter topic tools")
    dsub = dlq.add_subparsers(dest="verb", required=True)
    rp = dsub.add_parser("replay", help="republish dead letters to their source topic")
    rp.add_argument("--reason", choices=REASONS, help="only dead letters with this reason")
    rp.add_argument("--since", type=_timestamp, help="only dead letters at or after (RFC 3339)")
    rp.add_argument("--dry-run", action="store_true", help="count only; publish nothing")

    pos = sub.add_parser("positions", help="stored positions: show, reset")
    psub = pos.add_subparsers(dest="verb", required=True)
    show = psub.add_parser("show", help="stored position, high watermark and lag per partition")
    show.add_argument("--group", help="default: KAFKA_GROUP_ID")
    show.add_argument("--topic", action="append", help="repeatable; default: KAFKA_TOPICS")
    rs = psub.add_parser("reset", help="move stored positions (refuses while workers consume)")
    rs.add_argument("--group", help="default: KAFKA_GROUP_ID")
    rs.add_argument("--topic", required=True)
    rs.add_argument(
        "--partition", type=int, action="append", help="repeatable; default: every partition"
    )
    to = rs.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-earliest", action="store_true", help="the first retained record")
    to.add_argument("--to-latest", action="store_true", help="the high watermark")
    to.add_argument("--to-datetime", type=_timestamp, help="first record at or after (RFC 3339)")
    to.add_argument("--to-offset", type=int, help="this offset (must be in the log)")
    rs.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    rs.add_argument(
        "--force",
        action="store_true",
        help="even while the group has live members (docs/operations.md)",
    )

    sub.add_parser("report", help="calls by status, events by type, from the database")
    sub.add_parser("bench", help="benchmark (ingest bench --help)", add_help=False)
    sc = sub.add_parser("schema", help="print the event contract as JSON Schema")
    sc.add_argument("--output", type=Path)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from ingest.tools import bench

        return bench.main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "schema":
            return _schema(args.output)
        if args.command == "migrate" and args.verb == "create":
            from ingest.tools import migrate

            print(migrate.create(args.name))
            return 0
        if args.command == "produce":
            return _produce(args)
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"ingest: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    from ingest.service import logs

    logs.configure(settings.log_level)
    if args.command == "run":
        return _run(settings)
    if args.command == "migrate":
        return asyncio.run(_migrate(settings, args))
    if args.command == "report":
        return asyncio.run(_report(settings))
    if args.command == "dlq":
        return asyncio.run(_replay(settings, args))
    if args.command == "positions":
        return asyncio.run(_positions(settings, args))
    raise AssertionError(args.command)


def _timestamp(raw: str) -> datetime:
    ts = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    if ts.tzinfo is None:
        raise argparse.ArgumentTypeError("needs a time zone, e.g. 2026-11-25T10:00:00Z")
    return ts


async def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from ingest.service.security import kafka_options
    from ingest.tools.replay import replay

    stats = await replay(
        settings, args.reason, args.since, args.dry_run, kafka_options=kafka_options(settings)
    )
    verb = "would republish" if args.dry_run else "republished"
    print(f"scanned {stats.scanned} dead letters on {settings.kafka_dlq_topic}")
    for reason, n in sorted(stats.matched.items()):
        print(f"  {reason:<16} {n:>8} matched")
    print(
        f"{verb} {sum(stats.matched.values()) if args.dry_run else stats.republished}"
        f" record(s) to their source topics"
    )
    if stats.skipped_no_source:
        print(f"skipped {stats.skipped_no_source} record(s) without x-ingest-source-topic")
    return 0


async def _positions(settings: Settings, args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    group = args.group or settings.kafka_group_id
    conn = await _connect(settings)
    try:
        return await _positions_on(conn, settings, args, group)
    except (KafkaError, asyncpg.PostgresError, OSError, TimeoutError) as exc:
        text = (
            str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
        )
        print(f"ingest: positions {args.verb} failed: {text}", file=sys.stderr)
        return 1
    finally:
        await conn.close()


async def _positions_on(
    conn: asyncpg.Connection, settings: Settings, args: argparse.Namespace, group: str
) -> int:
    from ingest.service.security import kafka_options
    from ingest.tools import positions

    opts = kafka_options(settings)
    bootstrap = settings.kafka_bootstrap_servers
    if args.verb == "show":
        topics = args.topic or list(settings.kafka_topics)
        rows = await positions.show(conn, bootstrap, opts, group, topics)
        print(positions.format_show(group, rows))
        return 0
    if args.to_offset is not None and args.to_offset < 0:
        print("ingest: --to-offset must be >= 0", file=sys.stderr)
        return EXIT_CONFIG
    target = (
        positions.Target("offset", offset=args.to_offset)
        if args.to_offset is not None
        else positions.Target("datetime", at=args.to_datetime)
        if args.to_datetime is not None
        else positions.Target("latest" if args.to_latest else "earliest")
    )
    try:
        result = await positions.reset(
            conn,
            bootstrap,
            opts,
            group,
            args.topic,
            args.partition,
            target,
            dry_run=args.dry_run,
            force=args.force,
        )
    except positions.PositionsError as exc:
        print(f"ingest: positions reset refused: {exc}", file=sys.stderr)
        return 1
    print(positions.format_plan(group, result, args.dry_run))
    return 0


def _schema(output: Path | None) -> int:
    from ingest.pipeline.contract import json_schema

    text = orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    if output is None:
        sys.stdout.write(text.decode() + "\n")
    else:
        output.write_bytes(text + b"\n")
    return 0


# Collect cycles once per this many net allocations, not 700 (CPython's default): a batch
# is tens of thousands of short-lived, acyclic objects (records, events, their dicts), and
# each default young collection also walked every batch still held, in flight or buffered.
GC_YOUNG_THRESHOLD = 50_000


def tune_collector() -> None:
    """The collector as the worker runs with it: what is loaded now (modules, pydantic's
    validators, settings) lives as long as the process, so it is moved out of the
    collector's way (older collections stop walking it), and young collections come every
    ``GC_YOUNG_THRESHOLD`` allocations."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _run(settings: Settings) -> int:
    from ingest.pipeline.worker import Worker

    tune_collector()

    async def main() -> None:
        worker = Worker(settings)
        worker.install_signal_handlers()
        await worker.run()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    return 0


async def _connect(settings: Settings) -> asyncpg.Connection:
    try:
        from ingest.service.security import postgres_ssl

        return await asyncpg.connect(
            settings.database_url,
            timeout=settings.database_connection_timeout_ms / 1000,
            ssl=postgres_ssl(settings),
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise SystemExit(
            f"ingest: cannot connect to {settings.database_url_redacted}: "
            f"{type(exc).__name__}: {redact_url(str(exc))}"
        ) from None


async def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from ingest.tools import migrate

    conn = await _connect(settings)
    try:
        migrator = migrate.Migrator(
            conn,
            migrate.discover(),
            settings.chunk_interval,
            settings.readonly_password,
            compress_after=settings.compress_after,
            retention=settings.retention,
        )
        if args.verb == "up":
            done = await migrator.up(args.to)
            for m in done:
                print(f"applied  {m.version}_{m.name}")
            print(f"{len(done)} migration(s) applied")
        elif args.verb == "down":
            undone = await migrator.down(args.steps)
            for m in undone:
                print(f"reverted {m.version}_{m.name}")
            print(f"{len(undone)} migration(s) reverted")
        else:
            st = await migrator.status()
            for s in st.migrations:
                state = f"applied {s.applied_at:%Y-%m-%d %H:%M:%S}" if s.applied_at else "pending"
                flag = "  (file changed since applied)" if s.changed else ""
                print(f"{s.version}_{s.name:<30} {state}{flag}")
            print(
                f"timescaledb: {'installed' if st.timescaledb else 'not installed'}; "
                f"call_events: {'hypertable' if st.hypertable else 'plain table'}"
            )
            for line in _lifecycle_lines(st):
                print(line)
    except (migrate.MigrationError, asyncpg.PostgresError) as exc:
        print(f"ingest: migrate {args.verb} failed: {exc}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    return 0


def _lifecycle_lines(st: Status) -> list[str]:
    """The lifecycle part of ``migrate status``: policies, chunks, aggregates."""
    life = st.lifecycle
    lines = []
    if st.hypertable:
        lines.append(
            f"compression: {'after ' + life.compress_after if life.compress_after else 'no policy'}"
            f" ({life.compressed_chunks} of {life.chunks} chunks compressed); "
            f"retention: {'drop after ' + life.retention if life.retention else 'off'}"
        )
    for a in life.aggregates:
        if a.continuous:
            kind = "continuous aggregate"
            kind += f", refreshed every {a.refresh_every}" if a.refresh_every else ", no refresh"
            kind += ", real-time" if a.real_time else ""
        else:
            kind = "view"
        lines.append(f"aggregate: {a.name} ({kind})")
    if life.scheduler is not None:
        lines.append(life.scheduler.describe())
    return lines


async def _report(settings: Settings) -> int:
    from ingest.tools.report import summary

    conn = await _connect(settings)
    try:
        print(await summary(conn))
    finally:
        await conn.close()
    return 0


def _produce(args: argparse.Namespace) -> int:
    import os

    from ingest.tools.produce import produce

    if not 0 <= args.invalid_fraction <= 1:
        raise ConfigError("--invalid-fraction must be between 0 and 1")
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092")
    topic = args.topic or os.environ.get("KAFKA_TOPICS", "call-events").split(",")[0].strip()
    asyncio.run(produce(bootstrap, topic, args.calls, args.rate, args.invalid_fraction, args.seed))
    return 0
