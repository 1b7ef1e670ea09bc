"""The source: one Kafka consumer in the group, positioned from what PostgreSQL stored.

On assignment each partition is moved to the position stored with the data (the database
is the source of truth); partitions with no stored position start at the group's Kafka
commit, or at the earliest record for a new group. Kafka offsets are committed after each
stored batch as well, for lag tooling, and only for partitions this consumer still owns.

Before anything is read from a newly assigned partition, its stored position is checked
against the broker (``positions.check``): a position beyond the log end, or a record below
it that is not the one stored, means the topic is not the one the position was stored for
(deleted and created again, another cluster). Such a partition is *held*: paused, named in
one error with the ``ingest positions reset`` to run, and checked again every
``RECHECK_HELD_S`` until the stored position fits (after the reset) or it is revoked.

A stored position below the log start (a retention gap: records deleted before they were
stored) is held the same way by default; ``INGEST_ON_RETENTION_GAP=skip`` resumes at the
log start instead, counted and said once. The gap is found on assignment, and while running
when the broker answers a fetch with OFFSET_OUT_OF_RANGE (Apache Kafka does; Tansu 0.6
serves the next records it holds instead, so there only the assignment check finds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    KafkaError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    UnsupportedCodecError,
)
from aiokafka.structs import OffsetAndMetadata

from ingest.pipeline.positions import (
    Check,
    LogProbe,
    LogView,
    StoredPosition,
    Verdict,
    check,
    check_within,
    reset_command,
    start_or_close,
)
from ingest.pipeline.retry import short_error
from ingest.service import metrics
from ingest.service.settings import Settings

log = structlog.get_logger("ingest.source")

PositionLoader = Callable[[], Awaitable[dict[tuple[str, int], StoredPosition]]]
# Bounds the check of stored positions on assignment; past it the partitions resume unverified.
CHECK_TIMEOUT_S = 10.0
RECHECK_HELD_S = 5.0

# A record batch the client cannot turn into records: a CRC that does not match (corrupt
# on disk or on the wire), or a compression codec it has no library for (or never heard of).
UNDECODABLE = (CorruptRecordException, UnsupportedCodecError)
# After an undecodable batch, partitions are read one at a time until the culprit is found;
# back to the normal fetch when this long passes without another one.
ISOLATION_QUIET_S = 3.0


@dataclass(frozen=True, slots=True)
class Stall:
    """A partition stopped at ``offset``, the first record batch it cannot decode."""

    topic: str
    partition: int
    offset: int
    error: str

    def describe(self) -> str:
        """One line for /readyz and the log."""
        return f"{self.topic}/{self.partition} at offset {self.offset}: {self.error}"


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: EventSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._source._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._source._on_assigned(assigned)


class EventSource:
    """Reads records for the worker; knows which partitions are owned and where they stand."""

    def __init__(
        self,
        settings: Settings,
        load_positions: PositionLoader,
        on_revoked: Callable[[set[TopicPartition]], Awaitable[None]],
        kafka_options: dict[str, Any],
        on_seek: Callable[[dict[tuple[str, int], int]], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_seek = on_seek or (lambda _: None)
        self._load_positions = load_positions
        self._on_revoked_cb = on_revoked
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=settings.kafka_group_id,
            # A static member (KIP-345) is not sent LeaveGroup on stop: a replacement under
            # the same id within the session timeout takes its partitions back.
            group_instance_id=settings.kafka_group_instance_id,
            enable_auto_commit=False,
            # 'none': an out-of-range position raises, so a skip is loud, never silent.
            auto_offset_reset="none",
            isolation_level="read_committed",
            max_partition_fetch_bytes=1024 * 1024,
            fetch_max_bytes=16 * 1024 * 1024,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
            max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
            # Set, not left to follow the session timeout: the broker may hold a JoinGroup
            # this long, and the request timeout is checked against it (settings).
            rebalance_timeout_ms=settings.kafka_rebalance_timeout_ms,
            # The broker answers a fetch after this long even with little data: it bounds
            # how stale a record can get before it reaches a batch.
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
            # Partitions added to a subscribed topic are seen, and the group rebalanced to
            # read them, at the next metadata refresh: aiokafka's 5-minute default would
            # leave their records unread that long.
            metadata_max_age_ms=settings.kafka_metadata_max_age_ms,
            **kafka_options,
        )
        self.joined = False
        self.generation = 0
        self._paused_by_us: set[TopicPartition] = set()
        self._kafka_options = kafka_options
        # Partitions whose stored position does not fit the topic: paused until it does.
        self.held: dict[TopicPartition, str] = {}
        # The held partitions whose stored position is below the log start (retention gap).
        self.gaps: set[TopicPartition] = set()
        # Held because the broker refused their fetch position, not yet explained.
        self._unexplained: set[TopicPartition] = set()
        self._held_checked_at = 0.0
        # The client that checks stored positions, started once: a client of its own per
        # assignment cost a connection, metadata and version round trips inside the
        # assignment callback, before which aiokafka sends no heartbeat.
        self._probe: LogProbe | None = None
        self._probe_lock = asyncio.Lock()

        self.stalls: dict[TopicPartition, Stall] = {}
        # Partitions that raised an undecodable batch and are read one record at a time until
        # the batch is reached; None outside isolation.
        self._suspects: set[TopicPartition] | None = None
        self._isolating_since = 0.0

    async def start(self) -> None:
        """Connect and subscribe (aiokafka joins the group in the background), then start
        the position checker while the join is under way."""
        await self.consumer.start()
        self.consumer.subscribe(list(self._settings.kafka_topics), listener=_Listener(self))
        for topic in self._settings.kafka_topics:
            # Exported at 0 from the start: the first skip is then an increase alerts see.
            metrics.OFFSET_RESETS.labels(topic)
        probe = LogProbe(
            self._settings.kafka_bootstrap_servers, self._kafka_options, CHECK_TIMEOUT_S
        )
        try:
            await start_or_close(probe.consumer)
        except Exception as exc:
            # Each check then starts a client of its own (check_within).
            log.warning("position checker not started", error=short_error(exc))
        else:
            self._probe = probe

    async def stop(self) -> None:
        """Close connections. A dynamic member leaves the group; a static one does not
        (its partitions wait for its replacement for up to the session timeout)."""
        await self.consumer.stop()
        if self._probe is not None:
            probe, self._probe = self._probe, None
            with contextlib.suppress(Exception):
                await probe.consumer.stop()
        self.stalls.clear()
        metrics.PARTITIONS_STALLED.set(0)

    def owned(self) -> set[TopicPartition]:
        """The partitions assigned to this consumer now."""
        return set(self.consumer.assignment())

    async def fetch(self, timeout_ms: int, max_records: int) -> list[Any]:
        """Up to ``max_records`` records, in offset order per partition.

        A partition whose next record batch cannot be decoded is stalled there (see
        ``stalls``); the others keep flowing.
        """
        self._forget_stale_stalls()
        if self._suspects is not None:
            return await self._fetch_isolating(timeout_ms, max_records)
        before, generation = self._positions_now(), self.generation
        try:
            batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except UNDECODABLE as exc:
            # aiokafka has advanced the positions of records it then dropped with the
            # exception (other partitions' included): go back to what was handed out, and
            # read partition by partition to find the one that cannot be decoded.
            await self._rewind(before, generation)
            self._suspects = set()
            self._isolating_since = time.monotonic()
            log.warning(
                "a record batch could not be decoded; reading partitions one at a time to find it",
                error=short_error(exc),
            )
            return []
        except NoOffsetForPartitionError as exc:
            tp = exc.args[0] if exc.args else None
            log.info("no stored position, starting at the earliest record", partition=str(tp))
            await self._seek_to_beginning([tp] if isinstance(tp, TopicPartition) else None)
            return []
        except OffsetOutOfRangeError as exc:
            tps = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            if tps and self._settings.on_retention_gap == "hold":
                await self._hold_out_of_range(tps)
                return []
            for tp, offset in tps.items():
                metrics.OFFSET_RESETS.labels(tp.topic).inc()
                log.error(
                    "stored position is out of range on the broker: records before the "
                    "earliest retained offset are lost; resuming at the earliest",
                    topic=tp.topic,
                    partition=tp.partition,
                    position=offset,
                )
            await self._seek_to_beginning(list(tps) or None)
            return []
        records: list[Any] = []
        for tp_records in batches.values():
            records.extend(tp_records)
        return records

    def _positions_now(self) -> dict[TopicPartition, int]:
        """The client's next fetch position of every owned partition that has one.

        Read from aiokafka's assignment state: ``position()`` is a coroutine that may wait
        for a reset, and this is needed synchronously around every ``getmany``.
        """
        assignment = self.consumer._subscription.subscription
        if assignment is None or assignment.assignment is None:
            return {}
        out: dict[TopicPartition, int] = {}
        for tp in self.owned():
            state = assignment.assignment.state_value(tp)
            if state is not None and state.has_valid_position:
                out[tp] = int(state.position)
        return out

    async def _rewind(self, before: dict[TopicPartition, int], generation: int) -> None:
        """Seek back to ``before`` (positions taken before a failed call), or, when a
        rebalance ran during the call, to what the database stored: the seeks made on
        assignment were overtaken by records the client then dropped with the error."""
        targets = before
        if generation != self.generation:
            try:
                stored = await self._load_positions()
            except Exception as exc:
                # Without them the client's positions stand; the fence in the database
                # still drops anything stored twice, but records may be skipped: say so.
                log.error("cannot rewind after an undecodable batch", error=repr(exc))
                return
            targets = {
                tp: stored[(tp.topic, tp.partition)].next_offset
                for tp in self.owned()
                if (tp.topic, tp.partition) in stored
            }
        owned = self.owned()
        for tp, position in targets.items():
            if tp in owned:
                self.consumer.seek(tp, position)

    def _fetchable(self) -> list[TopicPartition]:
        paused = set(self.consumer.paused())
        return sorted(
            (tp for tp in self.owned() if tp not in paused and tp not in self.stalls),
            key=lambda tp: (tp.topic, tp.partition),
        )

    async def _fetch_isolating(self, timeout_ms: int, max_records: int) -> list[Any]:
        """One pass over the fetchable partitions, each read on its own. A partition that
        raises becomes a suspect and is stepped one record at a time from where it stood;
        when a step raises, its position is the first offset of the bad batch: it stalls."""
        assert self._suspects is not None
        self._suspects &= self.owned()
        fetchable = self._fetchable()
        records: list[Any] = []
        if not fetchable:
            # Everything paused or stalled: still poll (the group needs it), and wait.
            await self.consumer.getmany(timeout_ms=timeout_ms, max_records=1)
        wait_ms = max(1, timeout_ms // max(1, len(fetchable)))
        for tp in fetchable:
            if len(records) >= max_records:
                break
            if tp in self._suspects:
                records.extend(await self._step(tp, wait_ms, max_records - len(records)))
                continue
            before, generation = self._positions_now(), self.generation
            try:
                got = await self.consumer.getmany(
                    tp, timeout_ms=wait_ms, max_records=max_records - len(records)
                )
            except UNDECODABLE:
                self._isolating_since = time.monotonic()
                self._suspects.add(tp)
                await self._rewind({tp: before[tp]} if tp in before else {}, generation)
                continue
            records.extend(got.get(tp, []))
        quiet = time.monotonic() - self._isolating_since >= ISOLATION_QUIET_S
        if not self._suspects - set(self.stalls) and quiet:
            self._suspects = None
        return records

    async def _step(self, tp: TopicPartition, wait_ms: int, room: int) -> list[Any]:
        """Up to ``room`` records of a suspect, one per call, so that the client's position
        is exactly the bad batch's first offset when it raises; then the partition stalls."""
        records: list[Any] = []
        while len(records) < room:
            position, generation = self._positions_now().get(tp), self.generation
            try:
                got = await self.consumer.getmany(
                    tp, timeout_ms=0 if records else wait_ms, max_records=1
                )
            except UNDECODABLE as exc:
                self._isolating_since = time.monotonic()
                if position is None or generation != self.generation or tp not in self.owned():
                    await self._rewind({}, generation)
                else:
                    self.consumer.seek(tp, position)
                    self._stall(tp, position, exc)
                break
            if not got.get(tp):
                break
            records.extend(got[tp])
        return records

    def _stall(self, tp: TopicPartition, offset: int, exc: BaseException) -> None:
        self.consumer.pause(tp)
        self._paused_by_us.discard(tp)
        stall = Stall(tp.topic, tp.partition, offset, short_error(exc))
        self.stalls[tp] = stall
        metrics.UNDECODABLE_BATCHES.labels(tp.topic).inc()
        metrics.PARTITIONS_STALLED.set(len(self.stalls))
        log.error(
            "record batch cannot be decoded: partition stopped at this offset; nothing "
            "after it is read until an operator acts (see docs/operations.md, undecodable batches)",
            topic=tp.topic,
            partition=tp.partition,
            offset=offset,
            error=stall.error,
        )

    def _forget_stale_stalls(self) -> None:
        # A revoked partition is the next owner's to stall (or not). One assigned again
        # comes back unpaused, from its stored position: it is found again if still bad.
        owned, paused = self.owned(), set(self.consumer.paused())
        gone = [tp for tp in self.stalls if tp not in owned or tp not in paused]
        for tp in gone:
            del self.stalls[tp]
        if gone:
            metrics.PARTITIONS_STALLED.set(len(self.stalls))

    async def _seek_to_beginning(self, tps: list[TopicPartition] | None) -> None:
        owned = self.owned()
        targets = [tp for tp in (tps or owned) if tp in owned]
        if targets:
            await self.consumer.seek_to_beginning(*targets)

    async def commit(self, positions: dict[tuple[str, int], int]) -> None:
        """Commit stored positions to Kafka for owned partitions; failures are only logged."""
        owned = self.owned()
        offsets = {
            tp: OffsetAndMetadata(pos, "")
            for (topic, partition), pos in positions.items()
            if (tp := TopicPartition(topic, partition)) in owned
        }
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # The database holds the truth; the next batch's commit catches Kafka up.
            metrics.RETRIES.labels("kafka_commit").inc()
            log.warning("kafka offset commit failed", error=repr(exc))

    def pause(self) -> None:
        """Stop fetching from every owned partition (the fetch loop keeps polling)."""
        owned = self.owned()
        self.consumer.pause(*owned)
        # Stalled partitions stay paused when backpressure ends.
        self._paused_by_us = owned - set(self.stalls)
        metrics.PARTITIONS_PAUSED.set(len(owned))

    def resume(self) -> None:
        """Undo ``pause``."""
        owned = self.owned() & self._paused_by_us - self.held.keys()
        if owned:
            self.consumer.resume(*owned)
        self._paused_by_us = set()
        metrics.PARTITIONS_PAUSED.set(0)

    @property
    def paused(self) -> bool:
        """True while ``pause`` is in force."""
        return bool(self._paused_by_us)

    def report_lag(self, positions: dict[tuple[str, int], int]) -> None:
        """Set the lag gauge from the fetch high watermarks and the stored positions."""
        for tp in self.owned():
            hw = self.consumer.highwater(tp)
            pos = positions.get((tp.topic, tp.partition))
            if hw is not None and pos is not None:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, hw - pos))

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        started = time.monotonic()
        await self._on_revoked_cb(revoked)
        for tp in revoked:
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
        log.info(
            "partitions revoked",
            partitions=sorted(f"{t.topic}/{t.partition}" for t in revoked),
            took_s=round(time.monotonic() - started, 3),
        )

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.generation += 1
        # Nothing is read from a partition before its stored position has been checked.
        if assigned:
            self.consumer.pause(*assigned)
        self.held = {tp: why for tp, why in self.held.items() if tp in assigned}
        self.gaps &= assigned
        self._unexplained &= assigned
        stored: dict[tuple[str, int], StoredPosition] = {}
        for attempt in range(5):
            try:
                stored = await self._load_positions()
                break
            except Exception as exc:
                log.warning("cannot load stored positions", error=repr(exc), attempt=attempt)
                await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
        else:
            # Without the stored positions the Kafka commit is used; the fence in the
            # database still drops anything already stored, so this costs time, not data.
            log.error("stored positions unavailable; starting from Kafka's committed offsets")
        mine = {tp: s for tp in assigned if (s := stored.get((tp.topic, tp.partition))) is not None}
        skipped_to = await self._check_positions(mine, first=True)
        # Seek after the last await: a reset the fetch loop requested meanwhile (no Kafka
        # commit yet) would otherwise win over the stored position.
        self.seek({(tp.topic, tp.partition): s.next_offset for tp, s in mine.items()})
        for tp, offset in skipped_to.items():
            # Past the gap without telling the writer: the stored position stays where it
            # is until the next batch moves it (told, the writer would take the jump for a
            # position moved back under it, and seek back into the gap).
            self.consumer.seek(tp, offset)
        if self._paused_by_us:
            # Still backing off: keep the new partitions paused too.
            self.pause()
        elif runnable := assigned - self.held.keys():
            self.consumer.resume(*runnable)
        self.joined = True
        metrics.PARTITIONS_ASSIGNED.set(len(self.owned()))
        self._count_held()
        log.info(
            "partitions assigned",
            partitions=sorted(f"{t.topic}/{t.partition}" for t in assigned),
            from_database=len(mine),
            held=len(self.held),
        )

    async def _check_positions(
        self,
        stored: dict[TopicPartition, StoredPosition],
        first: bool,
        out_of_range: Mapping[TopicPartition, int] | None = None,
    ) -> dict[TopicPartition, int]:
        """Hold the partitions whose stored position does not fit the topic; release the
        held ones that fit now. Unverifiable ones go on (what the worker did before), except
        those the broker has just called ``out_of_range``: they stay held until a recheck.

        Returns where partitions skipped past a retention gap resume (their log start).
        """
        out_of_range = out_of_range or {}
        skipped_to: dict[TopicPartition, int] = {}
        if not stored:
            return skipped_to
        try:
            checks = await self._check(stored)
        except Exception as exc:
            if first and not out_of_range:
                log.warning(
                    "could not check stored positions against the broker; resuming unverified",
                    error=repr(exc),
                )
            for tp, offset in out_of_range.items():
                self._hold_unexplained(tp, offset, repr(exc))
            self._count_held()
            return skipped_to
        group = self._settings.kafka_group_id
        for tp, (c, view) in checks.items():
            # Said once per reason: what a held partition was last announced for (nothing
            # yet for one held a moment ago for a refusal the check had not explained).
            announced = (
                None
                if tp not in self.held or tp in self._unexplained
                else "gap"
                if tp in self.gaps
                else "mismatch"
            )
            self._unexplained.discard(tp)
            if c.verdict is Verdict.GAP and self._settings.on_retention_gap == "skip":
                assert view.log_start is not None  # a gap is only found against a log start
                if first or tp in self.held:
                    metrics.OFFSET_RESETS.labels(tp.topic).inc()
                    log.error(
                        "records were deleted from the broker before they were stored "
                        "(retention gap): they are lost; resuming at the earliest record "
                        "(INGEST_ON_RETENTION_GAP=skip)",
                        topic=tp.topic,
                        partition=tp.partition,
                        stored_position=stored[tp].next_offset,
                        log_start=view.log_start,
                        lost=view.log_start - stored[tp].next_offset,
                        found="fetch" if tp in out_of_range else "assignment",
                    )
                skipped_to[tp] = view.log_start
                if self.held.pop(tp, None) is not None and tp in self.owned():
                    self.consumer.seek(tp, view.log_start)
                    if not self._paused_by_us:
                        self.consumer.resume(tp)
                self.gaps.discard(tp)
                continue
            if c.verdict is Verdict.GAP:
                command = reset_command(group, tp.topic, tp.partition) + " --force"
                if first or announced != "gap":
                    # When it was found: on a new assignment, by a fetch the broker refused
                    # while running, or by the recheck of a partition held for another reason.
                    found = "fetch" if tp in out_of_range else "assignment" if first else "recheck"
                    assert view.log_start is not None
                    log.error(
                        "records were deleted from the broker before they were stored "
                        "(retention gap): partition held, nothing read from it; run the "
                        "reset to accept the loss and resume at the earliest record",
                        topic=tp.topic,
                        partition=tp.partition,
                        stored_position=stored[tp].next_offset,
                        log_start=view.log_start,
                        lost=view.log_start - stored[tp].next_offset,
                        found=found,
                        run=command,
                    )
                self.held[tp] = f"{tp.topic}/{tp.partition} {c.why}; `{command}` accepts the loss"
                self.gaps.add(tp)
                continue
            self.gaps.discard(tp)
            if c.verdict is Verdict.MISMATCH:
                if first or announced != "mismatch":
                    metrics.POSITION_MISMATCHES.labels(tp.topic).inc()
                    log.error(
                        "stored position does not belong to this topic: partition held, "
                        "nothing read from it; reset its position to resume",
                        topic=tp.topic,
                        partition=tp.partition,
                        stored_position=stored[tp].next_offset,
                        high_watermark=view.high_watermark,
                        why=c.why,
                        run=reset_command(group, tp.topic, tp.partition) + " --force",
                    )
                self.held[tp] = (
                    f"{tp.topic}/{tp.partition} stored position {stored[tp].next_offset}: {c.why}"
                )
                continue
            if tp in out_of_range:
                # The broker refused the position a moment ago, the check cannot tell why
                # (e.g. a leader change): held, and the recheck resumes it if it fits.
                self._hold_unexplained(tp, out_of_range[tp], c.why)
                continue
            if c.verdict is Verdict.UNVERIFIED and first:
                log.warning(
                    "stored position not verified; resuming from it",
                    topic=tp.topic,
                    partition=tp.partition,
                    stored_position=stored[tp].next_offset,
                    why=c.why,
                )
            self._release(tp, stored[tp].next_offset)
        self._count_held()
        return skipped_to

    def _release(self, tp: TopicPartition, position: int) -> None:
        """Resume a held partition at ``position`` (nothing to do for one not held)."""
        self._unexplained.discard(tp)
        if self.held.pop(tp, None) is None:
            return
        self.gaps.discard(tp)
        log.warning(
            "stored position fits the topic now; partition released",
            topic=tp.topic,
            partition=tp.partition,
            position=position,
        )
        if tp in self.owned():
            self.seek({(tp.topic, tp.partition): position})
            if not self._paused_by_us:
                self.consumer.resume(tp)

    def _hold_unexplained(self, tp: TopicPartition, offset: int, why: str) -> None:
        self._unexplained.add(tp)
        if tp not in self.held:
            log.warning(
                "position out of range on the broker, not explained by the log's bounds; "
                "partition held and checked again",
                topic=tp.topic,
                partition=tp.partition,
                position=offset,
                why=why,
            )
        self.held[tp] = (
            f"{tp.topic}/{tp.partition} position {offset} is out of range on the broker; "
            f"checked again every {RECHECK_HELD_S:g} s"
        )

    async def _hold_out_of_range(self, refused: Mapping[TopicPartition, int]) -> None:
        """The broker refused these fetch positions (OFFSET_OUT_OF_RANGE): pause them and
        judge their stored positions at once; below the log start is a retention gap."""
        owned = self.owned()
        refused = {tp: offset for tp, offset in refused.items() if tp in owned}
        if not refused:
            return
        self.consumer.pause(*refused)
        try:
            stored = await self._load_positions()
        except Exception as exc:
            log.warning("cannot load stored positions", error=repr(exc))
            stored = {}
        # Judged at the refused offset: the records below it were read, and those not
        # stored yet are in the batch in flight (the database catches up with its commit).
        positions = {
            tp: s
            if (s := stored.get((tp.topic, tp.partition))) and s.next_offset == offset
            else StoredPosition(offset)
            for tp, offset in refused.items()
        }
        self._held_checked_at = time.monotonic()
        await self._check_positions(positions, first=True, out_of_range=refused)

    def _count_held(self) -> None:
        metrics.PARTITIONS_HELD.set(len(self.held))
        metrics.PARTITIONS_AT_RETENTION_GAP.set(len(self.gaps))

    async def _check(
        self, stored: dict[TopicPartition, StoredPosition]
    ) -> dict[TopicPartition, tuple[Check, LogView]]:
        """``positions.check`` on the long-lived checker (one check at a time: the assignment
        callback and the held re-check share it), bounded by ``CHECK_TIMEOUT_S``."""
        async with self._probe_lock:
            probe = self._probe
            if probe is None:
                return await check_within(
                    self._settings.kafka_bootstrap_servers,
                    self._kafka_options,
                    stored,
                    CHECK_TIMEOUT_S,
                )
            try:
                async with asyncio.timeout(CHECK_TIMEOUT_S):
                    return await check(probe, stored)
            finally:
                # An assigned client keeps fetching in the background: release the partitions.
                probe.consumer.unsubscribe()

    def seek(self, positions: dict[tuple[str, int], int]) -> None:
        """Continue reading the owned ones of these partitions at these offsets."""
        owned = self.owned()
        done = {}
        for (topic, partition), offset in positions.items():
            if (tp := TopicPartition(topic, partition)) in owned:
                self.consumer.seek(tp, offset)
                done[(topic, partition)] = offset
        self._on_seek(done)

    async def recheck_held(self) -> None:
        """Check the held partitions again (at most every ``RECHECK_HELD_S``): after
        ``ingest positions reset`` their stored positions fit, and they resume."""
        now = time.monotonic()
        if not self.held or now - self._held_checked_at < RECHECK_HELD_S:
            return
        self._held_checked_at = now
        try:
            stored = await self._load_positions()
        except Exception as exc:
            log.warning("cannot load stored positions", error=repr(exc))
            return
        held = {
            tp: s
            for tp in list(self.held)
            if (s := stored.get((tp.topic, tp.partition))) is not None
        }
        await self._check_positions(held, first=False)

    def held_reason(self) -> str | None:
        """Why partitions are held (for /readyz), or None; a retention gap first."""
        if not self.held:
            return None
        more = f" (and {len(self.held) - 1} more held)" if len(self.held) > 1 else ""
        if gaps := sorted(self.held[tp] for tp in self.gaps if tp in self.held):
            return f"records deleted before they were stored (retention gap): {gaps[0]}{more}"
        reasons = sorted(self.held.values())
        return f"stored positions do not fit the topic: {reasons[0]}{more}"
