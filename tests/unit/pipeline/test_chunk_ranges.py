"""Which batches may create a TimescaleDB chunk: ``ChunkRanges.hold`` (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ingest.pipeline.sink import ChunkRanges

D0 = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def _days(*starts: int) -> ChunkRanges:
    return ChunkRanges([(D0 + n * DAY, D0 + (n + 1) * DAY) for n in starts])


def _hold(chunks: ChunkRanges, *times: datetime) -> bool:
    return chunks.hold(list(times), min(times), max(times))


def test_times_within_one_known_chunk_are_held() -> None:
    assert _hold(_days(0), D0, D0 + timedelta(hours=23))


def test_times_across_contiguous_known_chunks_are_held() -> None:
    assert _hold(_days(0, 1, 2), D0 + timedelta(hours=1), D0 + 2 * DAY + timedelta(hours=1))


def test_a_time_past_the_last_known_chunk_is_not_held() -> None:
    assert not _hold(_days(0, 1), D0 + timedelta(hours=1), D0 + 2 * DAY)


def test_a_time_before_the_first_known_chunk_is_not_held() -> None:
    assert not _hold(_days(1), D0 + timedelta(hours=12), D0 + DAY + timedelta(hours=1))


def test_times_on_both_sides_of_a_gap_are_held_when_none_falls_in_it() -> None:
    assert _hold(_days(0, 2), D0 + timedelta(hours=1), D0 + 2 * DAY + timedelta(hours=1))


def test_a_time_in_a_gap_between_known_chunks_is_not_held() -> None:
    chunks = _days(0, 2)
    assert not _hold(chunks, D0 + timedelta(hours=1), D0 + DAY + timedelta(hours=1), D0 + 2 * DAY)


def test_no_known_chunk_holds_nothing() -> None:
    assert not _hold(ChunkRanges(), D0)
