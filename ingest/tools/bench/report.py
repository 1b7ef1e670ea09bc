"""The bench's result: what one run measured, the machine it ran on, and the table."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg


@dataclass
class Result:
    """Everything one bench run measured."""

    events: int
    batch: int
    preload_s: float = 0.0
    db_ceiling_eps: float = 0.0
    read_ceiling_eps: float = 0.0
    drain_1_eps: float = 0.0
    drain_1_peak_rss_mb: float = 0.0
    drain_2_eps: float = 0.0
    drain_2_peak_rss_mb: list[float] = field(default_factory=list)
    steady_rate_eps: float = 0.0
    steady_seconds: float = 0.0
    freshness_p50_s: float = 0.0
    freshness_p95_s: float = 0.0
    freshness_p99_s: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)


async def machine(url: str, broker: str) -> dict[str, Any]:
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
    conn = await asyncpg.connect(url)
    try:
        pg = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": pg,
        "broker": broker,
        "date": datetime.now(UTC).isoformat(),
    }


def table(r: Result) -> str:
    """The human-readable result."""
    rows = [
        ("events", f"{r.events:,}", ""),
        ("batch size", f"{r.batch:,}", ""),
        (
            "database ceiling",
            f"{r.db_ceiling_eps:,.0f} ev/s",
            "COPY calls + COPY events + 1 UPDATE per batch",
        ),
        ("read ceiling", f"{r.read_ceiling_eps:,.0f} rec/s", "bare aiokafka consumer"),
        (
            "worker, 1 process",
            f"{r.drain_1_eps:,.0f} ev/s",
            f"{r.drain_1_eps / r.db_ceiling_eps:.2f} x db ceiling, "
            f"{r.drain_1_eps / r.read_ceiling_eps:.2f} x read ceiling",
        ),
        ("  peak RSS", f"{r.drain_1_peak_rss_mb:.0f} MB", ""),
        (
            "worker, 2 processes",
            f"{r.drain_2_eps:,.0f} ev/s",
            f"{r.drain_2_eps / r.db_ceiling_eps:.2f} x db ceiling",
        ),
        ("  peak RSS", " / ".join(f"{x:.0f}" for x in r.drain_2_peak_rss_mb) + " MB", ""),
        ("steady load", f"{r.steady_rate_eps:,.0f} ev/s for {r.steady_seconds:.0f} s", ""),
        (
            "  freshness p50/p95/p99",
            f"{r.freshness_p50_s:.3f} / {r.freshness_p95_s:.3f} / {r.freshness_p99_s:.3f} s",
            "commit time - event time",
        ),
    ]
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows)
