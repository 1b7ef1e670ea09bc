"""The look-back's time ranges: a batch's event times read as few spans as cover them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ingest.pipeline.sink import spans_of_times

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def test_times_within_two_windows_of_each_other_share_one_span() -> None:
    times = [T0 + timedelta(hours=h) for h in (5, 0, 47, 30)]
    assert spans_of_times(times, DAY) == [(T0, T0 + timedelta(hours=47))]


def test_a_late_event_far_behind_the_batch_gets_a_span_of_its_own() -> None:
    late = T0 - 30 * DAY
    times = [T0, T0 + timedelta(minutes=1), late]
    assert spans_of_times(times, DAY) == [(late, late), (T0, T0 + timedelta(minutes=1))]


def test_times_just_over_two_windows_apart_are_read_apart() -> None:
    gap = 2 * DAY + timedelta(seconds=1)
    assert spans_of_times([T0, T0 + gap], DAY) == [(T0, T0), (T0 + gap, T0 + gap)]
