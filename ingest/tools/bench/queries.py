"""The shipped queries (``schema/queries/*.sql``) timed on a database, each file run
unchanged the way it is meant to run: ``psql -f``.

psql, not asyncpg: the files may use psql's own commands (``\\if``, ``\\gset``, variables)
to run on both PostgreSQL and TimescaleDB. One psql session runs a file ``runs`` times with
``\\timing``; a run's time is the sum of its statements' times (client-observed, without
the connection), and the row keeps the median.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

_MARK = "@@ingest-bench-run"
_TIME = re.compile(r"^Time: ([0-9.]+) ms", re.MULTILINE)


@dataclass(slots=True)
class QueryTime:
    """One query file on one database: the median of its runs, or why it has none."""

    file: str
    median_ms: float | None = None
    runs_ms: list[float] = field(default_factory=list)
    error: str = ""


def query_files(directory: Path) -> list[Path]:
    """Every ``*.sql`` file of ``directory`` in name order; none when it does not exist."""
    return sorted(directory.glob("*.sql")) if directory.is_dir() else []


def run_times(output: str) -> list[float]:
    """Per run, the sum of the ``Time: ... ms`` lines psql printed between run markers."""
    return [sum(float(t) for t in _TIME.findall(part)) for part in output.split(_MARK)[1:]]


async def time_file(url: str, path: Path, runs: int, timeout_s: float = 600) -> QueryTime:
    """Run ``path`` ``runs`` times in one psql session on ``url``."""
    psql = shutil.which("psql")
    if psql is None:
        return QueryTime(path.name, error="psql not found (install postgresql-client)")
    args = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-o", "/dev/null"]
    args += ["-c", "\\timing on"]
    for _ in range(runs):
        args += ["-c", f"\\echo {_MARK}", "-f", str(path)]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return QueryTime(path.name, error=f"did not finish {runs} runs in {timeout_s:.0f} s")
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        return QueryTime(path.name, error=lines[-1] if lines else f"psql exit {proc.returncode}")
    times = run_times(out.decode(errors="replace"))
    return QueryTime(path.name, statistics.median(times) if times else None, times)


async def time_queries(url: str, directory: Path, runs: int) -> list[QueryTime]:
    """Every query file of ``directory`` timed on ``url``, one after the other."""
    return [await time_file(url, f, runs) for f in query_files(directory)]
