"""The batch histogram exports what prometheus_client's Histogram would for the same values."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from ingest.service.metrics import BatchHistogram

BUCKETS = (0.025, 0.05, 0.5, 1, 30, 86400)


def exposition(registry: CollectorRegistry) -> list[str]:
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if not line.startswith("#") and "_created" not in line
    ]


@pytest.mark.parametrize(
    "values",
    [[], [0.0], [0.025, 0.025000001, 0.5, 1, 1.0000001], [86400, 86401, 1e12], [0.3] * 1000],
)
def test_a_batch_is_exported_like_one_observation_per_value(values):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    BatchHistogram("freshness_seconds", "doc", BUCKETS, registry=ours).observe_many(values)
    reference = Histogram("freshness_seconds", "doc", buckets=BUCKETS, registry=theirs)
    for v in values:
        reference.observe(v)
    assert exposition(ours) == exposition(theirs)


def test_batches_accumulate():
    registry = CollectorRegistry()
    h = BatchHistogram("freshness_seconds", "doc", BUCKETS, registry=registry)
    h.observe_many([0.01, 2])
    h.observe_many([0.01])
    assert 'freshness_seconds_bucket{le="0.025"} 2.0' in exposition(registry)
    assert "freshness_seconds_count 3.0" in exposition(registry)
