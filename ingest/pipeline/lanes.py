"""Write lanes: the owned partitions spread over a few lanes, each with its own batch and at
most one write in flight, so that one process keeps more than one transaction going.

One write at a time left the database idle while the process decoded and prepared the next
batch, and the process idle while the database worked: one process drained at two thirds
of what one connection writing prepared rows could (``ingest bench``). Two lanes overlap
the two, and the server uses a second core.

What keeps it exact: a partition belongs to one lane from the moment its first record is
seen until it is revoked, so its batches are written one after the other, in offset order,
as before; each batch still locks its partitions' stored positions (the fence) in its own
transaction. Lanes share nothing in the database but the ``agents`` rows an initiation
touches (see ``sink._TOUCH_AGENTS``: locked in key order, so two lanes never deadlock).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ingest.pipeline.batch import BatchBuilder
from ingest.pipeline.sink import Item, TopicPartitionKey
from ingest.pipeline.writes import InFlightWrite


@dataclass(frozen=True, slots=True)
class Lane:
    """A batch being built and the write in flight of the partitions that map to it."""

    batch: BatchBuilder
    write: InFlightWrite


class WriteLanes:
    """The worker's lanes, and which partition goes to which."""

    def __init__(self, lanes: list[Lane]) -> None:
        if not lanes:
            raise ValueError("at least one lane")
        self._lanes = lanes
        self._lane_of: dict[TopicPartitionKey, int] = {}
        self._load = [0] * len(lanes)

    def __iter__(self) -> Iterator[Lane]:
        return iter(self._lanes)

    def __len__(self) -> int:
        """Records buffered in all lanes' batches."""
        return sum(len(lane.batch) for lane in self._lanes)

    def lane_of(self, key: TopicPartitionKey) -> Lane:
        """The lane of a partition: fixed once seen; a new one goes to the lane with the
        fewest partitions (the lowest on a tie), so the load spreads whatever the
        partition numbers are."""
        return self._lanes[self._index_of(key)]

    def _index_of(self, key: TopicPartitionKey) -> int:
        index = self._lane_of.get(key)
        if index is None:
            index = min(range(len(self._lanes)), key=self._load.__getitem__)
            self._lane_of[key] = index
            self._load[index] += 1
        return index

    def add(self, items: Iterable[Item]) -> None:
        """Append items to their partitions' lanes (in consumption order within each)."""
        if len(self._lanes) == 1:
            self._lanes[0].batch.add(items)
            return
        by_lane: dict[int, list[Item]] = {}
        for item in items:
            ref = item.ref
            by_lane.setdefault(self._index_of((ref.topic, ref.partition)), []).append(item)
        for index, part in by_lane.items():
            self._lanes[index].batch.add(part)

    @property
    def room(self) -> int:
        """How many more records one fetch may bring: the room of the fullest batch (a
        fetch may bring them all for its lane)."""
        return min(lane.batch.room for lane in self._lanes)

    def time_left(self) -> float:
        """Seconds until the first non-empty batch is due (a batch's wait when all are
        empty)."""
        waiting = [lane.batch.time_left() for lane in self._lanes if len(lane.batch)]
        return min(waiting) if waiting else self._lanes[0].batch.max_wait_s

    def ready(self) -> list[Lane]:
        """The lanes whose batch should be written now."""
        return [lane for lane in self._lanes if lane.batch.ready()]

    def drop(self, keep: Callable[[Item], bool]) -> int:
        """Remove buffered items that ``keep`` rejects, from every lane; return how many."""
        return sum(lane.batch.drop(keep) for lane in self._lanes)

    def forget(self, keys: Iterable[TopicPartitionKey]) -> None:
        """Partitions no longer owned: a later assignment places them afresh."""
        for key in keys:
            index = self._lane_of.pop(key, None)
            if index is not None:
                self._load[index] -= 1

    def idle(self) -> bool:
        """True while no lane has a database write under way."""
        return all(lane.write.idle.is_set() for lane in self._lanes)

    async def wait_idle(self) -> None:
        """Return once no lane has a database write under way (all at the same time)."""
        while not self.idle():
            for lane in self._lanes:
                await lane.write.idle.wait()

    async def abandon(self) -> None:
        """End every write still in flight (shutdown; see ``InFlightWrite.abandon``)."""
        await asyncio.gather(*(lane.write.abandon() for lane in self._lanes))
