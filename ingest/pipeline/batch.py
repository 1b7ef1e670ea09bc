"""Decode consumed records and gather them into batches: full at ``max_events``, or due
``max_wait_s`` after the first record came in, whichever is first. Pure; no I/O."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from ingest.pipeline.contract import RecordRef, decode, new_tuple
from ingest.pipeline.sink import Item


def to_item(record: Any) -> Item:
    """Decode one aiokafka ``ConsumerRecord`` into an ``Item``."""
    ref = new_tuple(RecordRef, (record.topic, record.partition, record.offset))
    value, timestamp = record.value, record.timestamp
    return new_tuple(Item, (ref, record.key, value, decode(value, ref, timestamp), timestamp))


class BatchBuilder:
    """Accumulates items until the batch is full or due."""

    def __init__(
        self,
        max_events: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.max_events = max_events
        self.max_wait_s = max_wait_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: list[Item] = []
        self._bytes = 0
        self._started: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def room(self) -> int:
        """How many more items fit (none once the byte budget is spent)."""
        if self._bytes >= self.max_bytes:
            return 0
        return max(0, self.max_events - len(self._items))

    def add(self, items: Iterable[Item]) -> None:
        """Append items (in consumption order)."""
        before = len(self._items)
        self._items.extend(items)
        self._bytes += sum(_size(i) for i in self._items[before:])
        if before == 0 and self._items:
            self._started = self._clock()

    def time_left(self) -> float:
        """Seconds until the batch is due (``max_wait_s`` when empty)."""
        if self._started is None:
            return self.max_wait_s
        return max(0.0, self._started + self.max_wait_s - self._clock())

    def ready(self) -> bool:
        """True when the batch should be written now."""
        return bool(self._items) and (self.room == 0 or self.time_left() <= 0)

    def take(self) -> list[Item]:
        """Hand over the batch and start a new one."""
        items, self._items, self._started, self._bytes = self._items, [], None, 0
        return items

    def drop(self, keep: Callable[[Item], bool]) -> int:
        """Remove items that ``keep`` rejects (e.g. of revoked partitions); return how many."""
        before = len(self._items)
        self._items = [i for i in self._items if keep(i)]
        self._bytes = sum(_size(i) for i in self._items)
        if not self._items:
            self._started = None
        return before - len(self._items)


def _size(item: Item) -> int:
    return len(item.value or b"") + len(item.key or b"")
