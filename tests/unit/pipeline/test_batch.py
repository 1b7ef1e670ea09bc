"""BatchBuilder: full at max_events or due max_wait_s after its first item, whichever is first."""

from __future__ import annotations

from types import SimpleNamespace

from ingest.pipeline.batch import BatchBuilder, to_item
from ingest.pipeline.contract import CallEvent, RecordRef, Rejection
from ingest.pipeline.sink import Item


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def item(offset: int, partition: int = 0) -> Item:
    ref = RecordRef("call-events", partition, offset)
    return Item(ref, None, b"x", Rejection("invalid_json", "test item"))


def items(*offsets: int, partition: int = 0) -> list[Item]:
    return [item(o, partition) for o in offsets]


def builder(max_events: int = 3, max_wait_s: float = 0.2) -> tuple[BatchBuilder, FakeClock]:
    clock = FakeClock()
    return BatchBuilder(max_events, max_wait_s, clock=clock), clock


def test_new_batch_is_empty_and_not_ready() -> None:
    b, _ = builder()

    assert len(b) == 0
    assert not b.ready()
    assert b.room == 3
    assert b.time_left() == 0.2


def test_empty_batch_is_never_ready_however_long_it_waits() -> None:
    b, clock = builder()
    clock.advance(3600)

    assert not b.ready()
    assert b.time_left() == 0.2


def test_adding_nothing_does_not_start_the_timer() -> None:
    b, clock = builder()
    b.add([])
    clock.advance(1)

    assert b.time_left() == 0.2


def test_batch_is_ready_when_full_at_max_events() -> None:
    b, _ = builder(max_events=3)

    b.add(items(1, 2))
    assert not b.ready()

    b.add(items(3))
    assert b.ready()
    assert b.room == 0


def test_batch_overfilled_in_one_add_is_ready_with_no_room() -> None:
    b, _ = builder(max_events=3)

    b.add(items(1, 2, 3, 4, 5))

    assert len(b) == 5
    assert b.room == 0
    assert b.ready()


def test_room_counts_what_still_fits() -> None:
    b, _ = builder(max_events=5)
    b.add(items(1, 2))

    assert b.room == 3


def test_batch_is_not_due_before_max_wait() -> None:
    b, clock = builder(max_wait_s=0.2)
    b.add(items(1))
    clock.advance(0.15)

    assert not b.ready()
    assert abs(b.time_left() - 0.05) < 1e-9


def test_batch_is_due_after_max_wait() -> None:
    b, clock = builder(max_wait_s=0.2)
    b.add(items(1))
    clock.advance(0.2)

    assert b.time_left() == 0.0
    assert b.ready()


def test_time_left_never_goes_negative() -> None:
    b, clock = builder(max_wait_s=0.2)
    b.add(items(1))
    clock.advance(10)

    assert b.time_left() == 0.0


def test_timer_starts_at_first_item_not_at_later_ones() -> None:
    b, clock = builder(max_events=100, max_wait_s=0.25)
    b.add(items(1))
    clock.advance(0.125)
    b.add(items(2))
    clock.advance(0.125)

    assert b.ready()


def test_take_hands_over_items_in_order() -> None:
    b, _ = builder(max_events=10)
    b.add(items(1, 2))
    b.add(items(3))

    taken = b.take()

    assert [i.ref.offset for i in taken] == [1, 2, 3]


def test_take_starts_a_new_batch() -> None:
    b, clock = builder(max_events=2, max_wait_s=0.2)
    b.add(items(1, 2))
    clock.advance(1)

    b.take()

    assert len(b) == 0
    assert b.room == 2
    assert not b.ready()
    assert b.time_left() == 0.2


def test_after_take_timer_restarts_at_next_first_item() -> None:
    b, clock = builder(max_events=10, max_wait_s=0.2)
    b.add(items(1))
    clock.advance(1)
    b.take()

    b.add(items(2))
    clock.advance(0.1)

    assert not b.ready()


def test_take_of_empty_batch_returns_nothing() -> None:
    b, _ = builder()

    assert b.take() == []


def test_drop_removes_rejected_items_and_counts_them() -> None:
    b, _ = builder(max_events=10)
    b.add(items(1, 2, partition=0) + items(3, 4, partition=1))

    dropped = b.drop(lambda i: i.ref.partition != 1)

    assert dropped == 2
    assert [i.ref.offset for i in b.take()] == [1, 2]


def test_drop_frees_room() -> None:
    b, _ = builder(max_events=3)
    b.add(items(1, 2, 3))

    b.drop(lambda i: i.ref.offset == 1)

    assert b.room == 2
    assert not b.ready()


def test_drop_keeps_timer_while_items_remain() -> None:
    b, clock = builder(max_events=10, max_wait_s=0.2)
    b.add(items(1, 2))
    clock.advance(0.2)

    b.drop(lambda i: i.ref.offset == 1)

    assert b.ready()


def test_drop_of_everything_resets_timer() -> None:
    b, clock = builder(max_events=10, max_wait_s=0.2)
    b.add(items(1, 2))
    clock.advance(0.2)

    assert b.drop(lambda _: False) == 2
    assert b.time_left() == 0.2

    b.add(items(3))
    assert not b.ready()


def test_drop_of_nothing_returns_zero() -> None:
    b, _ = builder()
    b.add(items(1))

    assert b.drop(lambda _: True) == 0
    assert len(b) == 1


def test_to_item_decodes_a_consumer_record() -> None:
    value = (
        b'{"call_id":"0b0b0b0b-0000-4000-8000-000000000001","event_type":"answer","event_data":{}}'
    )
    record = SimpleNamespace(
        topic="call-events", partition=2, offset=7, key=b"k", value=value, timestamp=0
    )

    it = to_item(record)

    assert it.ref == RecordRef("call-events", 2, 7)
    assert (it.key, it.value) == (b"k", value)
    assert isinstance(it.decoded, CallEvent)
    assert it.decoded.ref == it.ref


def test_to_item_keeps_a_rejection() -> None:
    record = SimpleNamespace(
        topic="call-events", partition=0, offset=1, key=None, value=b"nope", timestamp=0
    )

    it = to_item(record)

    assert isinstance(it.decoded, Rejection)
    assert it.decoded.reason == "invalid_json"
