"""Reading a worker's samples without labels (a histogram's sum, a gauge) from its
Prometheus text, as the bench does."""

from __future__ import annotations

from ingest.tools.bench.drains import sample

BODY = """\
# HELP ingest_batch_write_seconds Time to store one batch.
# TYPE ingest_batch_write_seconds histogram
ingest_batch_write_seconds_bucket{le="0.005"} 0.0
ingest_batch_write_seconds_count 41.0
ingest_batch_write_seconds_sum 6.25
ingest_batch_write_seconds_created 1.7e+09
ingest_dedup_look_back_seconds_sum 0.125
"""


def test_the_sum_of_a_histogram_is_read_by_its_exact_name() -> None:
    assert sample(BODY, "ingest_batch_write_seconds_sum") == 6.25
    assert sample(BODY, "ingest_dedup_look_back_seconds_sum") == 0.125


def test_a_histogram_absent_from_the_text_sums_to_zero() -> None:
    assert sample(BODY, "ingest_dedup_look_back_sum") == 0.0
    assert sample("", "ingest_batch_write_seconds_sum") == 0.0
