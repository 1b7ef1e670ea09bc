"""The bench's repeats (``--repeat-every``): copies of earlier events, as a producer retries."""

from __future__ import annotations

from typing import Any

from ingest.tools.bench.corpus import with_repeats


def _corpus(n: int) -> list[dict[str, Any]]:
    return [{"id": str(i)} for i in range(1, n + 1)]


def test_after_every_kth_event_the_event_lag_before_it_comes_again() -> None:
    out = [e["id"] for e in with_repeats(_corpus(9), every=3, lag=2)]
    assert out == ["1", "2", "3", "1", "4", "5", "6", "4", "7", "8", "9", "7"]


def test_no_copy_before_lag_events_were_published() -> None:
    out = [e["id"] for e in with_repeats(_corpus(4), every=1, lag=3)]
    assert out == ["1", "2", "3", "4", "1"]


def test_every_zero_publishes_the_corpus_alone() -> None:
    assert list(with_repeats(_corpus(5), every=0, lag=1)) == _corpus(5)
