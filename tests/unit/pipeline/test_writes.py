"""A stored batch: what it tells the breaker, and what it reports."""

from __future__ import annotations

from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from ingest.pipeline.contract import RecordRef, Rejection
from ingest.pipeline.deadletter import DeadLetter
from ingest.pipeline.sink import Item, WriteResult
from ingest.pipeline.writes import StoredBatch


def item(offset: int) -> Item:
    return Item(RecordRef("call-events", 0, offset), None, b"{}", Rejection("bad", "bad"))


def dead_letter(i: Item) -> DeadLetter:
    return DeadLetter(i.ref, i.key, i.value, "schema_invalid", "field required")


def dead_lettered(reason: str) -> float:
    value = REGISTRY.get_sample_value("ingest_events_dead_lettered_total", {"reason": reason})
    return value or 0.0


def test_the_breaker_hears_which_records_were_dead_lettered_in_order() -> None:
    items = [item(o) for o in range(4)]
    result = WriteResult(dead_letters=[dead_letter(items[1]), dead_letter(items[3])])

    assert StoredBatch(items, result, 0.1).outcomes() == [False, True, False, True]


def test_a_batch_without_dead_letters_tells_the_breaker_none() -> None:
    items = [item(o) for o in range(3)]

    assert StoredBatch(items, WriteResult(), 0.1).outcomes() == [False] * 3


def test_each_dead_letter_is_counted_by_reason_and_logged_with_its_origin() -> None:
    items = [item(o) for o in range(3)]
    result = WriteResult(dead_letters=[dead_letter(items[2])])
    before = dead_lettered("schema_invalid")

    with capture_logs() as logs:
        StoredBatch(items, result, 0.1).report(commit_s=0.01)

    assert dead_lettered("schema_invalid") == before + 1
    [line] = [e for e in logs if e["event"] == "dead-lettered a record"]
    assert (line["topic"], line["partition"], line["offset"]) == ("call-events", 0, 2)
    assert line["reason"] == "schema_invalid"
