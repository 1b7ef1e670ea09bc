"""The bench's CPU clock for worker processes."""

from __future__ import annotations

import os
import time

from ingest.tools.bench.drains import cpu_seconds


def _burn(seconds: float) -> None:
    until = time.process_time() + seconds
    while time.process_time() < until:
        pass


def test_cpu_time_below_a_clock_tick_is_counted() -> None:
    # /proc/PID/stat counts in 10 ms ticks: 2 ms of work there mostly reads as none.
    before = cpu_seconds(os.getpid())
    _burn(0.002)
    spent = cpu_seconds(os.getpid()) - before
    assert 0.001 < spent < 0.5


def test_a_process_that_is_gone_has_no_cpu_time() -> None:
    assert cpu_seconds(2**22 + 12345) == 0.0
