"""Stored positions outside the batch transaction: what they are checked against on the broker.

Owns the position SQL the batch transaction does not run (loading positions with their
fingerprints, moving them on an operator's reset) and the broker side of the check that a
stored position still belongs to the log it was stored for:

- ``fingerprint``: a digest of one record (timestamp, key, value), written with each
  position for the record just below it (``sink._ADVANCE_POSITIONS``);
- ``LogProbe``: a consumer outside any group that reads, per partition, the log start, the
  high watermark (from a fetch: Tansu's ListOffsets answer is wrong after batched produces)
  and single records;
- ``judge``: pure; the verdict for one partition from what was stored and what the broker has.

Kafka 0.14's client does not expose topic ids (its Metadata requests predate them), so a
recreated topic is recognised by its content, not by its id.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

TopicPartitionKey = tuple[str, int]

_LOAD = """
SELECT topic, partition, next_offset, last_record_fingerprint
FROM ingest_consumer_offsets WHERE consumer_group = $1
"""

# Taken FOR UPDATE: a batch transaction holding these rows (the fence) finishes first, and
# one that starts later waits for the reset and then sees the new positions.
_LOCK_FOR_RESET = """
SELECT topic, partition, next_offset FROM ingest_consumer_offsets
WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int[])
ORDER BY partition
FOR UPDATE
"""

_RESET = """
INSERT INTO ingest_consumer_offsets AS o
    (consumer_group, topic, partition, next_offset, last_record_fingerprint)
SELECT $1, $2, v.partition, v.next_offset, NULL
FROM unnest($3::int[], $4::bigint[]) AS v(partition, next_offset)
ON CONFLICT (consumer_group, topic, partition) DO UPDATE
SET next_offset = EXCLUDED.next_offset, last_record_fingerprint = NULL, updated_at = now()
"""


@dataclass(frozen=True, slots=True)
class StoredPosition:
    """The next offset to store for one partition, and the fingerprint of the record below it."""

    next_offset: int
    fingerprint: bytes | None = None


def fingerprint(timestamp: int, key: bytes | None, value: bytes | None) -> bytes:
    """A 16-byte digest of one record's timestamp, key and value (None and b"" differ)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(struct.pack(">q", timestamp))
    for part in (key, value):
        h.update(struct.pack(">q", -1 if part is None else len(part)))
        if part:
            h.update(part)
    return h.digest()


async def load(conn: asyncpg.Connection, group: str) -> dict[TopicPartitionKey, StoredPosition]:
    """Every stored position of ``group`` with its fingerprint."""
    rows = await conn.fetch(_LOAD, group)
    return {
        (r["topic"], r["partition"]): StoredPosition(
            r["next_offset"],
            bytes(r["last_record_fingerprint"])
            if r["last_record_fingerprint"] is not None
            else None,
        )
        for r in rows
    }


async def move(
    conn: asyncpg.Connection, group: str, topic: str, targets: Mapping[int, int]
) -> dict[int, int | None]:
    """Set the stored positions of ``topic``'s partitions to ``targets`` (partition -> offset)
    in one transaction; the fingerprints are cleared (the operator chose these positions).

    Returns each partition's position just before, read under the row lock (None: no row).
    """
    parts = sorted(targets)
    async with conn.transaction():
        rows = await conn.fetch(_LOCK_FOR_RESET, group, topic, parts)
        before: dict[int, int | None] = dict.fromkeys(parts)
        before.update({r["partition"]: r["next_offset"] for r in rows})
        await conn.execute(_RESET, group, topic, parts, [targets[p] for p in parts])
    return before


# ------------------------------------------------------------------------------ verdict


class Verdict(Enum):
    """What the check concluded for one partition."""

    OK = "ok"
    # The record to compare with is gone (retention, compaction) or could not be read:
    # resuming is what the worker did before this check existed; it says so in the log.
    UNVERIFIED = "unverified"
    MISMATCH = "mismatch"
    # The stored position is below the log start: the records in between were deleted
    # (retention, DeleteRecords) before they were stored. What then is a setting's choice.
    GAP = "gap"


@dataclass(frozen=True, slots=True)
class Check:
    """A verdict and why."""

    verdict: Verdict
    why: str


@dataclass(frozen=True, slots=True)
class LogView:
    """What the broker has for one partition (None: not learned before the deadline)."""

    log_start: int | None
    high_watermark: int | None
    # The first record fetched at the position asked for: (offset, fingerprint).
    record: tuple[int, bytes] | None = None


def judge(stored: StoredPosition, log: LogView) -> Check:
    """Does ``stored`` belong to the log the broker has now? Pure."""
    pos, fp = stored.next_offset, stored.fingerprint
    hw = log.high_watermark
    if hw is not None and pos > hw:
        return Check(
            Verdict.MISMATCH,
            f"stored position {pos} is beyond the log end {hw}: the topic was recreated "
            "or is another cluster's",
        )
    start = log.log_start
    if start is not None and pos < start:
        return Check(
            Verdict.GAP,
            f"stored position {pos} is below the log start {start}: records {pos} to "
            f"{start - 1} were deleted (retention) before they were stored",
        )
    if pos == 0 or fp is None:
        return Check(Verdict.OK, "no stored record to compare with")
    if hw is None:
        return Check(Verdict.UNVERIFIED, "high watermark not learned in time")
    if start is not None and pos - 1 < start:
        # The position is the log start: nothing is missing, only the record to compare.
        return Check(Verdict.UNVERIFIED, f"record {pos - 1} was deleted (log starts at {start})")
    if log.record is None:
        return Check(Verdict.UNVERIFIED, f"record {pos - 1} could not be fetched in time")
    offset, found = log.record
    if offset != pos - 1:
        return Check(
            Verdict.UNVERIFIED,
            f"record {pos - 1} is gone (compacted or a control record; next is {offset})",
        )
    if found != fp:
        return Check(
            Verdict.MISMATCH,
            f"the record at offset {pos - 1} is not the one stored there: the topic was "
            "recreated or is another cluster's",
        )
    return Check(Verdict.OK, f"record {pos - 1} matches")


def reset_command(group: str, topic: str, partition: int | None, to: str = "--to-earliest") -> str:
    """The ``ingest positions reset`` command for one partition (or a whole topic)."""
    where = f" --partition {partition}" if partition is not None else ""
    return f"ingest positions reset --group {group} --topic {topic}{where} {to}"


# -------------------------------------------------------------------------------- probe


class LogProbe:
    """A consumer outside any group, for reading log bounds and single records.

    Only used on assignment and by operator tools; never on the hot path.
    """

    def __init__(self, bootstrap: str, kafka_options: Mapping[str, Any], timeout_s: float = 5.0):
        self.timeout_s = timeout_s
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            # A fetch at the log end returns after this long with the high watermark.
            fetch_max_wait_ms=100,
            **kafka_options,
        )

    async def __aenter__(self) -> LogProbe:
        await start_or_close(self.consumer)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def partitions(self, topic: str) -> list[int]:
        """The topic's partitions as the broker has them now (empty: no such topic)."""
        await self.consumer.topics()  # refresh metadata
        return sorted(self.consumer.partitions_for_topic(topic) or ())

    async def bounds(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, LogView]:
        """Log start and high watermark per partition.

        The high watermark comes from a fetch at the offset ListOffsets calls the end: on
        Kafka that is the end and the fetch returns none; on Tansu, after batched produces,
        it is the last batch's first offset + 1 (21 for 30 records in three batches), and
        the fetch's high watermark is the truth.
        """
        tps = list(tps)
        if not tps:
            return {}
        c = self.consumer
        c.assign(tps)
        starts = await c.beginning_offsets(tps)
        ends = await c.end_offsets(tps)
        for tp in tps:
            c.seek(tp, ends[tp])
        deadline = time.monotonic() + self.timeout_s
        missing = list(tps)
        while missing and time.monotonic() < deadline:
            await c.getmany(*missing, timeout_ms=100)
            missing = [tp for tp in missing if c.highwater(tp) is None]
        return {tp: LogView(starts.get(tp), c.highwater(tp)) for tp in tps}

    async def records_at(
        self, offsets: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, tuple[int, bytes]]:
        """The first record at or after each offset: (offset, fingerprint); missing when
        nothing came before the deadline. The partitions must be assigned (``bounds``)."""
        c = self.consumer
        for tp, offset in offsets.items():
            c.seek(tp, offset)
        found: dict[TopicPartition, tuple[int, bytes]] = {}
        deadline = time.monotonic() + self.timeout_s
        pending = [tp for tp in offsets]
        while pending and time.monotonic() < deadline:
            got = await c.getmany(*pending, timeout_ms=100)
            for tp, recs in got.items():
                if recs and tp not in found:
                    r = recs[0]
                    found[tp] = (r.offset, fingerprint(r.timestamp, r.key, r.value))
            pending = [tp for tp in pending if tp not in found]
        return found

    async def first_at_or_after(
        self, tp: TopicPartition, timestamp_ms: int, high_watermark: int
    ) -> int:
        """The offset of the first record with a timestamp at or after ``timestamp_ms``
        (the high watermark when there is none). ListOffsets by time narrows the search;
        the records themselves decide (Tansu answers with a batch's first offset, and with
        offset 0, timestamp -1 for a time past the last record)."""
        c = self.consumer
        hint = (await c.offsets_for_times({tp: timestamp_ms})).get(tp)
        if hint is None or hint.timestamp < 0:
            return high_watermark
        c.seek(tp, hint.offset)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            got = await c.getmany(tp, timeout_ms=100)
            for r in got.get(tp, []):
                if r.timestamp >= timestamp_ms:
                    return int(r.offset)
                if r.offset + 1 >= high_watermark:
                    return high_watermark
        raise TimeoutError(f"{tp.topic}/{tp.partition}: no answer from the broker in time")


async def start_or_close(consumer: AIOKafkaConsumer) -> None:
    """Start ``consumer``; if that fails, release what it opened before raising."""
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()
        raise


async def check(
    probe: LogProbe, stored: Mapping[TopicPartition, StoredPosition]
) -> dict[TopicPartition, tuple[Check, LogView]]:
    """The verdict for each partition with a stored position (see ``judge``)."""
    views = await probe.bounds(stored)
    wanted = {
        tp: s.next_offset - 1
        for tp, s in stored.items()
        if s.fingerprint is not None
        and s.next_offset > 0
        and (hw := views[tp].high_watermark) is not None
        and s.next_offset <= hw
        and (views[tp].log_start or 0) <= s.next_offset - 1
    }
    records = await probe.records_at(wanted) if wanted else {}
    out: dict[TopicPartition, tuple[Check, LogView]] = {}
    for tp, s in stored.items():
        v = views[tp]
        view = LogView(v.log_start, v.high_watermark, records.get(tp))
        out[tp] = (judge(s, view), view)
    return out


async def check_within(
    bootstrap: str,
    kafka_options: Mapping[str, Any],
    stored: Mapping[TopicPartition, StoredPosition],
    timeout_s: float,
) -> dict[TopicPartition, tuple[Check, LogView]]:
    """``check`` with a probe of its own, all of it bounded by ``timeout_s``."""
    if not stored:
        return {}
    async with asyncio.timeout(timeout_s), LogProbe(bootstrap, kafka_options, timeout_s) as p:
        return await check(p, stored)
