"""The dedup window's cost, measured in the run: one-process drains of the same topic into the
same history database, with the window as the workers are configured
(``INGEST_DEDUP_WINDOW``, 24 hours by default) and with ``INGEST_DEDUP_WINDOW=off``, in
alternating order, so that a machine speeding up or slowing down through the pairs
favours neither side. The cost is the sum of the window-on drains' rates over the sum of
the window-off ones' (1.00: none; the target is at least 0.95). Identical drains here differ
by up to a fifth, more than that target, so the window-on drains' workers also report the
time their look-backs took, as a share of their time storing batches."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields

from ingest.service.settings import ConfigError, Settings, interval_or_off
from ingest.tools.bench.drains import Drain

WINDOW_VARIABLE = "INGEST_DEDUP_WINDOW"
# The worker's default, from its settings, so the two cannot drift apart.
DEFAULT_WINDOW = str(next(f.default for f in fields(Settings) if f.name == "dedup_window"))


@dataclass
class DedupCost:
    """The pairs of drains of one history state, window on and off."""

    window: str
    on: list[Drain] = field(default_factory=list)
    off: list[Drain] = field(default_factory=list)
    # sum(on rates) / sum(off rates); 0 until both sides have a drain.
    on_over_off: float = 0.0
    # Of the window-on drains' time storing batches, the share spent in the look-back: the
    # window's own cost, which the rates resolve only to the spread of identical drains.
    look_back_share: float = 0.0


def configured_window(environ: Mapping[str, str]) -> str:
    """The window the bench's workers would run with, as the worker reads it.

    Raises ``ConfigError`` when it is not valid, and when it is off: the pairs would then
    compare the window off with itself."""
    raw = environ.get(WINDOW_VARIABLE, DEFAULT_WINDOW)
    window = interval_or_off(WINDOW_VARIABLE, raw)
    if window == "off":
        raise ConfigError(
            f"--dedup-pairs compares the dedup window on and off, but {WINDOW_VARIABLE}=off: "
            "unset it or give the window to measure"
        )
    return window


def order(pair: int) -> tuple[bool, bool]:
    """Which side drains first in the pair numbered ``pair`` (from 0): the window on first in
    even pairs, off first in odd ones (True: on)."""
    return (True, False) if pair % 2 == 0 else (False, True)


def worker_settings(window: str, on: bool) -> dict[str, str]:
    """The environment one side's workers get on top of the bench's."""
    return {WINDOW_VARIABLE: window if on else "off"}


def on_over_off(on: list[Drain], off: list[Drain]) -> float:
    """The window-on drains' summed rate over the window-off ones' (0 when either is empty)."""
    off_eps = sum(d.eps for d in off)
    return sum(d.eps for d in on) / off_eps if on and off_eps > 0 else 0.0


def look_back_share(on: list[Drain]) -> float:
    """The window-on drains' summed look-back time over their summed write time (0 when
    nothing was written)."""
    write_s = sum(d.write_s for d in on)
    return sum(d.look_back_s for d in on) / write_s if write_s > 0 else 0.0


async def measure(
    drain: Callable[[Mapping[str, str]], Awaitable[Drain]],
    pairs: int,
    window: str,
    say: Callable[[str], None],
) -> DedupCost:
    """``pairs`` alternating pairs of ``drain`` (one worker process, given its extra
    environment), the window on and off."""
    cost = DedupCost(window)
    for pair in range(pairs):
        for on in order(pair):
            say(f"dedup window {'on' if on else 'off'}, pair {pair + 1} of {pairs}")
            d = await drain(worker_settings(window, on))
            (cost.on if on else cost.off).append(d)
    cost.on_over_off = on_over_off(cost.on, cost.off)
    cost.look_back_share = look_back_share(cost.on)
    return cost
