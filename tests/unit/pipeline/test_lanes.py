"""Write lanes: each partition in one lane, the load spread, batches per lane."""

from __future__ import annotations

from typing import Any, cast

from ingest.pipeline.batch import BatchBuilder
from ingest.pipeline.contract import RecordRef, Rejection
from ingest.pipeline.lanes import Lane, WriteLanes
from ingest.pipeline.sink import Item
from ingest.pipeline.writes import InFlightWrite


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write() -> InFlightWrite:
    # Only the write's idle event is used here; it holds its collaborators without calling them.
    none = cast(Any, None)
    return InFlightWrite(none, none, none, none, none, on_reset=lambda p, i: i)


def lanes(n: int = 2, max_events: int = 3, clock: Clock | None = None) -> WriteLanes:
    clock = clock or Clock()
    return WriteLanes([Lane(BatchBuilder(max_events, 0.2, clock=clock), write()) for _ in range(n)])


def item(partition: int, offset: int, topic: str = "call-events") -> Item:
    return Item(RecordRef(topic, partition, offset), None, b"x", Rejection("bad", "test"))


def offsets(lane: Lane) -> list[tuple[int, int]]:
    return [(i.ref.partition, i.ref.offset) for i in lane.batch.take()]


def test_a_partition_stays_in_the_lane_it_was_first_seen_in() -> None:
    w = lanes()
    first = w.lane_of(("call-events", 4))
    w.lane_of(("call-events", 0))

    assert w.lane_of(("call-events", 4)) is first


def test_new_partitions_go_to_the_lane_with_the_fewest_whatever_their_numbers() -> None:
    w = lanes()
    got = [w.lane_of(("call-events", p)) for p in (0, 2, 4, 6)]

    a, b = list(w)
    assert [lane is a for lane in got] == [True, False, True, False]
    assert b in got


def test_records_go_to_their_partitions_lane_in_consumption_order() -> None:
    w = lanes(max_events=10)
    w.add([item(0, 1), item(1, 1), item(0, 2), item(1, 2), item(0, 3)])

    a, b = list(w)
    assert offsets(a) == [(0, 1), (0, 2), (0, 3)]
    assert offsets(b) == [(1, 1), (1, 2)]


def test_room_is_the_fullest_batchs() -> None:
    w = lanes(max_events=5)
    w.add([item(0, 1), item(0, 2), item(0, 3), item(1, 1)])

    assert (len(w), w.room) == (4, 2)


def test_only_the_lane_whose_batch_is_full_is_ready() -> None:
    w = lanes(max_events=2)
    w.add([item(0, 1), item(1, 1), item(0, 2)])

    [ready] = w.ready()
    assert offsets(ready) == [(0, 1), (0, 2)]


def test_a_lane_is_due_by_its_own_first_record() -> None:
    clock = Clock()
    w = lanes(clock=clock)
    w.add([item(0, 1)])
    clock.now += 0.15
    w.add([item(1, 1)])

    assert round(w.time_left(), 3) == 0.05
    clock.now += 0.05
    [ready] = w.ready()
    assert offsets(ready) == [(0, 1)]


def test_a_revoked_partition_is_placed_afresh_when_assigned_again() -> None:
    w = lanes()
    a, b = list(w)
    w.lane_of(("call-events", 0))
    w.lane_of(("call-events", 1))
    w.forget([("call-events", 0), ("call-events", 1)])
    w.lane_of(("call-events", 1))

    assert w.lane_of(("call-events", 7)) is b
    assert w.lane_of(("call-events", 1)) is a


def test_drop_removes_items_from_every_lane() -> None:
    w = lanes(max_events=10)
    w.add([item(0, 1), item(1, 1), item(0, 2)])

    assert w.drop(lambda i: i.ref.offset != 1) == 2
    assert len(w) == 1


def test_idle_only_while_no_lane_writes() -> None:
    w = lanes()
    a, _ = list(w)
    assert w.idle()
    a.write.idle.clear()

    assert not w.idle()
