"""Reading a worker's histogram sums from its Prometheus text, as the bench does."""

from __future__ import annotations

from ingest.tools.bench.drains import metric_sum

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
    assert metric_sum(BODY, "ingest_batch_write_seconds") == 6.25
    assert metric_sum(BODY, "ingest_dedup_look_back_seconds") == 0.125


def test_a_histogram_absent_from_the_text_sums_to_zero() -> None:
    assert metric_sum(BODY, "ingest_dedup_look_back") == 0.0
    assert metric_sum("", "ingest_batch_write_seconds") == 0.0
