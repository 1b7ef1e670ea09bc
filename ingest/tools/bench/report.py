"""The bench's result: what one run measured, the machine it ran on, and the table."""

from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.tools.bench.dedup import DedupCost, order
from ingest.tools.bench.drains import Drain
from ingest.tools.bench.queries import QueryTime
from ingest.tools.bench.soak import Soak

if TYPE_CHECKING:
    # ladder.py measures with the floor, whose module reads this one's Result.
    from ingest.tools.bench.ladder import Ladder


@dataclass
class State:
    """One database in one state (empty tables, history, compressed history)."""

    name: str
    ceiling_eps: float = 0.0
    drains: list[Drain] = field(default_factory=list)
    queries: list[QueryTime] = field(default_factory=list)
    # The dedup window on against off (``--dedup-pairs``; history states only).
    dedup: DedupCost | None = None


@dataclass
class HistoryFigures:
    """The history a server's history states were measured on."""

    days: int
    calls_per_day: int
    calls: int
    events: int
    reused: bool
    generated_s: float


@dataclass
class CompressionFigures:
    """call_events on disk before and after compressing the old chunks."""

    chunks: int
    size_before_bytes: int
    size_after_bytes: int
    chunks_before_bytes: int
    chunks_after_bytes: int
    # Compressing (or, when the cached history was found compressed, decompressing) took.
    transition: str
    transition_s: float


@dataclass
class Steady:
    """The worker at a fixed offered load."""

    seconds: float
    rate_eps: float
    freshness_p50_s: float
    freshness_p95_s: float
    freshness_p99_s: float


@dataclass
class Server:
    """Everything measured on one database server."""

    name: str
    version: str
    states: list[State] = field(default_factory=list)
    history: HistoryFigures | None = None
    compression: CompressionFigures | None = None
    steady: Steady | None = None
    soak: Soak | None = None
    # Where the CPU per event above the floor goes (``--ladder``; ladder.py).
    ladder: Ladder | None = None


@dataclass
class Result:
    """Everything one bench run measured."""

    events: int
    batch: int
    preload_s: float = 0.0
    # Copies of events published again (``--repeat-every``): stored once, counted as repeats.
    repeats: int = 0
    read_ceiling_eps: float = 0.0
    # CPU per record of a bare Python reader of the corpus (floor.py).
    floor_us_per_record: float = 0.0
    servers: list[Server] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)


async def machine(broker: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kb = 0
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "broker": broker,
        "date": datetime.now(UTC).isoformat(),
    }


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


def _drain_row(d: Drain, st: State, empty: State | None, read_eps: float) -> list[Row]:
    label = f"worker, {d.processes} process{'es' if d.processes > 1 else ''}"
    rate = f"{d.eps:,.0f} ev/s" + ("" if d.finished else " (cut short)")
    notes = [f"{_ratio(d.eps, st.ceiling_eps)} x db ceiling"]
    if d.ceiling_eps > 0:
        notes = [
            f"{_ratio(d.eps, d.ceiling_eps)} x db ceiling around it "
            f"({d.ceiling_eps:,.0f} ev/s), {_ratio(d.eps, st.ceiling_eps)} x the best"
        ]
    if empty is not None and empty is not st:
        notes.append(f"{_ratio(d.eps, _first_drain(empty, d.processes))} x empty")
    elif d.processes == 1:
        notes.append(f"{_ratio(d.eps, read_eps)} x read ceiling")
    if not d.finished:
        notes.append(f"{d.events:,} events in {d.seconds:.0f} s")
    elif d.events == 0:
        notes = ["all committed before the first poll: too few events to measure"]
    rss = " / ".join(f"{x:.0f}" for x in d.peak_rss_mb)
    return [
        (f"    {label}", rate, ", ".join(notes)),
        ("      CPU per event, peak RSS", _cpu(d), f"{rss} MB"),
    ]


def _median_rows(st: State) -> list[Row]:
    """Per process count drained more than once: the median drain / ceiling around it, and
    the median CPU as a multiple of the floor, each with its range."""
    rows: list[Row] = []
    for processes in sorted({d.processes for d in st.drains}):
        runs = [d for d in st.drains if d.processes == processes and d.ceiling_eps > 0]
        if len(runs) < 2:
            continue
        ratios = sorted(d.eps / d.ceiling_eps for d in runs)
        cpu = sorted(d.cpu_x_floor for d in runs)
        label = f"{processes} process{'es' if processes > 1 else ''}"
        rows.append(
            (
                f"    median of {len(runs)} drains, {label}",
                f"{statistics.median(ratios):.2f} x db ceiling around it",
                f"range {ratios[0]:.2f}-{ratios[-1]:.2f}; CPU {statistics.median(cpu):.2f} x "
                f"floor ({cpu[0]:.2f}-{cpu[-1]:.2f})",
            )
        )
    return rows


def _dedup_rows(cost: DedupCost) -> list[Row]:
    """The window on against off: the ratio of the summed rates, then each pair's rates in
    the order they ran."""
    pairs = []
    for i, (on, off) in enumerate(zip(cost.on, cost.off, strict=False)):
        first, second = ((on, "on"), (off, "off")) if order(i)[0] else ((off, "off"), (on, "on"))
        pairs.append(f"{first[1]} {first[0].eps:,.0f}, {second[1]} {second[0].eps:,.0f}")
    return [
        (
            f"    dedup window {cost.window} on / off",
            f"{cost.on_over_off:.2f} x",
            f"{len(cost.on)} pair(s), ev/s: " + "; ".join(pairs),
        ),
        (
            "      look-back, window on",
            f"{cost.look_back_share:.1%}",
            "of the workers' time storing batches",
        ),
    ]


def _cpu(d: Drain) -> str:
    us = f"{d.cpu_us_per_event:.1f} us"
    if d.cpu_x_floor <= 0:
        return us
    around = f" ({d.floor_us:.1f} us)" if d.floor_us > 0 else ""
    return f"{us} = {d.cpu_x_floor:.2f} x floor{around}"


def _first_drain(st: State, processes: int) -> float:
    return next((d.eps for d in st.drains if d.processes == processes), 0.0)


def _mb(b: int) -> str:
    return f"{b / 2**20:,.0f} MB"


def _server_rows(srv: Server, read_eps: float) -> list[Row]:
    rows: list[Row] = [(f"{srv.name} {srv.version}", "", "")]
    empty = srv.states[0] if srv.states and srv.states[0].name == "empty tables" else None
    for st in srv.states:
        note = ""
        if st is not empty and srv.history is not None:
            h = srv.history
            how = "reused" if h.reused else "generated"
            note = (
                f"{h.events:,} events, {h.calls:,} calls; {how}, "
                f"generation took {h.generated_s:.0f} s"
            )
        rows.append((f"  {st.name}", "", note))
        for q in st.queries:
            value = f"{q.median_ms:,.1f} ms" if q.median_ms is not None else "failed"
            detail = q.error or f"median of {len(q.runs_ms)} runs"
            rows.append((f"    query {q.file}", value, detail))
        rows.append(
            (
                "    database ceiling",
                f"{st.ceiling_eps:,.0f} ev/s",
                "same-work, other ids, best of the runs before and after the drains",
            )
        )
        for d in st.drains:
            rows += _drain_row(d, st, empty, read_eps)
        rows += _median_rows(st)
        if st.dedup is not None:
            rows += _dedup_rows(st.dedup)
        if st is empty and srv.ladder is not None:
            rows += _ladder_rows(srv.ladder)
        if "compressed" in st.name and srv.compression is not None:
            c = srv.compression
            rows.append(
                (
                    "    call_events on disk",
                    f"{_mb(c.size_before_bytes)} -> {_mb(c.size_after_bytes)}",
                    f"{_ratio(c.size_before_bytes, c.size_after_bytes)} x smaller; "
                    f"compressed chunks {_ratio(c.chunks_before_bytes, c.chunks_after_bytes)} x "
                    f"({c.chunks} chunks, {c.transition} took {c.transition_s:.0f} s)",
                )
            )
    if srv.steady is not None:
        s = srv.steady
        rows.append(("  steady load", f"{s.rate_eps:,.0f} ev/s for {s.seconds:.0f} s", ""))
        rows.append(
            (
                "    freshness p50/p95/p99",
                f"{s.freshness_p50_s:.3f} / {s.freshness_p95_s:.3f} / {s.freshness_p99_s:.3f} s",
                "commit time - event time",
            )
        )
    if srv.soak is not None:
        rows += _soak_rows(srv.soak)
    return rows


def _ladder_rows(ladder: Ladder) -> list[Row]:
    rows: list[Row] = [
        (
            "    CPU ladder",
            "",
            f"this process, {ladder.records:,} records per rung, one batch at a time",
        )
    ]
    for rung in ladder.rungs:
        rows.append(
            (
                f"      {rung.name}",
                f"{rung.us_per_record:.1f} us = {rung.x_floor:.2f} x floor",
                "",
            )
        )
    return rows


# The RSS curve as printed: at most this many points (the JSON holds every sample).
_CURVE_POINTS = 20


def _soak_rows(s: Soak) -> list[Row]:
    step = max(1, math.ceil(len(s.rss_mb) / _CURVE_POINTS))
    curve = " ".join(f"{x:.0f}" for x in s.rss_mb[::step])
    exact = "exact" if s.exact else f"NOT exact: {s.stored_rows:,} rows, {s.stored_ids:,} ids"
    f = s.fifths

    def by_fifth(fmt: str, values: list[float]) -> str:
        return " / ".join(fmt.format(v) for v in values)

    return [
        (
            f"  soak, {s.offered_eps:,.0f} ev/s offered",
            f"{s.rate_eps:,.0f} ev/s for {s.seconds / 60:.1f} min",
            f"{s.events:,} events, {exact}",
        ),
        (
            "    RSS after warm-up -> end",
            f"{s.rss_after_warmup_mb:.1f} -> {s.rss_end_mb:.1f} MB",
            f"growth {s.rss_growth_mb:+.1f} MB (noise {s.rss_noise_mb:.1f} MB); "
            f"warm-up the first fifth ({s.warmup_s:.0f} s); medians of the 2nd and last fifth",
        ),
        (f"    RSS every {s.rss_every_s * step:.0f} s, MB", "", curve),
        (
            "    freshness p99, first -> last fifth",
            f"{f[0].freshness_p99_s:.3f} -> {f[-1].freshness_p99_s:.3f} s",
            f"{s.p99_ratio:.2f} x; produce -> stored, from outside",
        ),
        (
            "    worker's share p99, first -> last fifth",
            f"{f[0].worker_p99_s:.3f} -> {f[-1].worker_p99_s:.3f} s",
            f"{s.worker_p99_ratio:.2f} x; fetchable -> stored (the broker's share: "
            f"{f[0].broker_p99_s:.3f} -> {f[-1].broker_p99_s:.3f} s)",
        ),
        (
            "    by fifth: p50 | p99 | max | broker p99 | worker p99, s",
            "",
            " | ".join(
                by_fifth("{:.3f}", [getattr(x, a) for x in f])
                for a in (
                    "freshness_p50_s",
                    "freshness_p99_s",
                    "freshness_max_s",
                    "broker_p99_s",
                    "worker_p99_s",
                )
            ),
        ),
        (
            "    by fifth: write ms | batch | CPU us/ev worker, bench, broker",
            "",
            " | ".join(
                (
                    by_fifth("{:.0f}", [x.write_mean_ms for x in f]),
                    by_fifth("{:.0f}", [x.batch_mean_events for x in f]),
                    by_fifth("{:.1f}", [x.worker_cpu_us_per_event for x in f]),
                    by_fifth("{:.1f}", [x.bench_cpu_us_per_event for x in f]),
                    by_fifth("{:.1f}", [x.broker_cpu_us_per_event for x in f]),
                )
            ),
        ),
        (
            "    tables at the end",
            "",
            f"autovacuum {s.server_autovacuum}; "
            + "; ".join(
                f"{t.name} {_mb(t.total_bytes)}, {t.dead_rows:,} dead, "
                f"{t.hot_updates:,}/{t.updates:,} HOT, {t.autovacuums} autovacuums"
                for t in s.tables
            ),
        ),
    ]


Row = tuple[str, str, str]


def table(r: Result) -> str:
    """The human-readable result."""
    rows: list[Row] = []
    if r.events:  # a soak-only run has no corpus
        rows += [
            ("events", f"{r.events:,}", ""),
            ("batch size", f"{r.batch:,}", ""),
            *(
                [("repeats", f"{r.repeats:,}", "copies of published events, published again")]
                if r.repeats
                else []
            ),
            ("read ceiling", f"{r.read_ceiling_eps:,.0f} rec/s", "bare aiokafka consumer"),
        ]
    if r.floor_us_per_record > 0:
        rows.append(
            (
                "Python floor",
                f"{r.floor_us_per_record:.1f} us",
                "CPU per record: aiokafka read, orjson decode, id, call id, time parsed",
            )
        )
    for srv in r.servers:
        rows += _server_rows(srv, r.read_ceiling_eps)
    rows += [("skipped", reason, "") for reason in r.skipped]
    # Headings (no value) run into the columns rather than widen them.
    w0 = max(len(a) for a, b, _ in rows if b)
    w1 = max(len(b) for _, b, _ in rows)
    return "\n".join(
        f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() if b else f"{a}  {c}".rstrip() for a, b, c in rows
    )
