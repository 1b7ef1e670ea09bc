"""``ingest positions show | reset``: the stored positions, and moving them as an operator.

Positions live in PostgreSQL with the data, so ``kafka-consumer-groups --reset-offsets``
does not move the worker; this does, with the same choices (earliest, latest, a time, an
offset; one partition or a whole topic; a dry run).

A reset refuses while the group has members, unless ``--force``: moving positions under a
running worker is then deliberate. It is also safe: the reset runs in one transaction that
takes the positions rows ``FOR UPDATE``, so it serialises with a batch transaction holding
them; a live worker's next batch below a forward move is fenced, and one past a backward
move finds the position behind its reads, rolls back and seeks to it
(``sink.PositionsMovedBack``). Every move is
logged (who, what, from, to), and the group's Kafka offsets are committed to the new
positions, so lag tooling agrees with the database.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from ingest.pipeline import positions
from ingest.pipeline.positions import LogProbe, LogView

log = structlog.get_logger("ingest.positions")

TARGETS = ("earliest", "latest", "datetime", "offset")


class PositionsError(Exception):
    """The reset cannot be done as asked (the message says why); nothing was changed."""


class Refused(PositionsError):
    """The group has live members and ``--force`` was not given."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where to move: ``earliest``, ``latest``, ``datetime`` (with ``at``), ``offset``."""

    kind: str
    offset: int | None = None
    at: datetime | None = None

    def describe(self) -> str:
        """As the operator wrote it."""
        if self.kind == "offset":
            return f"offset {self.offset}"
        if self.kind == "datetime":
            assert self.at is not None
            return f"datetime {self.at.isoformat()}"
        return self.kind


@dataclass(frozen=True, slots=True)
class PartitionState:
    """One line of ``positions show``."""

    topic: str
    partition: int
    stored: int | None
    high_watermark: int | None
    committed: int | None
    check: str

    @property
    def lag(self) -> int | None:
        """Records between the stored position and the high watermark."""
        if self.stored is None or self.high_watermark is None:
            return None
        return max(0, self.high_watermark - self.stored)


@dataclass(frozen=True, slots=True)
class Move:
    """One partition's planned (or done) move."""

    topic: str
    partition: int
    stored: int | None
    to: int


@dataclass(slots=True)
class ResetResult:
    """What a reset planned and did."""

    moves: list[Move]
    members: list[str]
    applied: bool = False
    kafka_committed: bool = False
    kafka_error: str | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------- group


async def group_members(bootstrap: str, kafka_options: Mapping[str, Any], group: str) -> list[str]:
    """The group's live members as ``member_id@host`` (Kafka's DescribeGroups)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka_options)
    await admin.start()
    try:
        responses = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    out: list[str] = []
    for response in responses:
        for g in response.to_object()["groups"]:
            if g["group"] != group:
                continue
            for m in g["members"]:
                host = m.get("client_host") or "?"
                out.append(f"{m['member_id']}@{host}")
    return sorted(out)


def _group_probe(bootstrap: str, kafka_options: Mapping[str, Any], group: str) -> AIOKafkaConsumer:
    # Manual assignment with the group's id: reads and commits the group's offsets without
    # joining it (a join would trigger a rebalance of the workers).
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, **kafka_options
    )


# -------------------------------------------------------------------------------- show


async def show(
    conn: asyncpg.Connection,
    bootstrap: str,
    kafka_options: Mapping[str, Any],
    group: str,
    topics: Sequence[str],
) -> list[PartitionState]:
    """Per topic and partition: stored position, high watermark, Kafka's committed offset,
    and whether the stored position fits the topic (``positions.judge``)."""
    stored = await positions.load(conn, group)
    rows: list[PartitionState] = []
    committer = _group_probe(bootstrap, kafka_options, group)
    await positions.start_or_close(committer)
    try:
        async with LogProbe(bootstrap, kafka_options) as probe:
            for topic in topics:
                present = set(await probe.partitions(topic))
                parts = present | {p for (t, p) in stored if t == topic}
                tps = [TopicPartition(topic, p) for p in sorted(parts)]
                on_broker = [tp for tp in tps if tp.partition in present]
                mine = {
                    tp: s
                    for tp in on_broker
                    if (s := stored.get((tp.topic, tp.partition))) is not None
                }
                views = await probe.bounds(on_broker)
                checks = await positions.check(probe, mine) if mine else {}
                committer.assign(on_broker)
                for tp in tps:
                    s = stored.get((tp.topic, tp.partition))
                    view = views.get(tp, LogView(None, None))
                    if tp not in views:
                        verdict = "partition not on the broker"
                    elif tp in checks:
                        c = checks[tp][0]
                        verdict = (
                            c.verdict.value
                            if c.verdict.value == "ok"
                            else (f"{c.verdict.value}: {c.why}")
                        )
                    else:
                        verdict = "no stored position"
                    committed = await committer.committed(tp) if tp in views else None
                    rows.append(
                        PartitionState(
                            topic,
                            tp.partition,
                            s.next_offset if s is not None else None,
                            view.high_watermark,
                            committed,
                            verdict,
                        )
                    )
    finally:
        await committer.stop()
    return rows


def format_show(group: str, rows: Sequence[PartitionState]) -> str:
    """The table ``ingest positions show`` prints."""

    def cell(v: int | None) -> str:
        return "-" if v is None else str(v)

    head = ("topic", "partition", "stored", "high_watermark", "lag", "kafka_committed", "check")
    table = [head] + [
        (
            r.topic,
            str(r.partition),
            cell(r.stored),
            cell(r.high_watermark),
            cell(r.lag),
            cell(r.committed),
            r.check,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(head) - 1)]
    lines = [f"group {group}"]
    for line in table:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line[:-1], widths, strict=True))
        ]
        lines.append("  ".join([*cells, line[-1]]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- reset


async def plan(
    probe: LogProbe,
    stored: Mapping[tuple[str, int], positions.StoredPosition],
    topic: str,
    partitions: Sequence[int] | None,
    target: Target,
) -> list[Move]:
    """Where each partition would move (reads the broker; changes nothing)."""
    on_broker = await probe.partitions(topic)
    if not on_broker:
        raise PositionsError(f"topic {topic} does not exist on the broker")
    wanted = sorted(set(partitions)) if partitions else on_broker
    missing = [p for p in wanted if p not in on_broker]
    if missing:
        raise PositionsError(f"topic {topic} has no partition {missing[0]} (it has {on_broker})")
    tps = [TopicPartition(topic, p) for p in wanted]
    views = await probe.bounds(tps)
    moves: list[Move] = []
    for tp in tps:
        view = views[tp]
        start, hw = view.log_start, view.high_watermark
        if start is None or hw is None:
            raise PositionsError(f"{topic}/{tp.partition}: the broker did not answer in time")
        if target.kind == "earliest":
            to = start
        elif target.kind == "latest":
            to = hw
        elif target.kind == "offset":
            assert target.offset is not None
            to = target.offset
            if not start <= to <= hw:
                raise PositionsError(
                    f"{topic}/{tp.partition}: offset {to} is outside the log [{start}, {hw}]"
                )
        else:
            assert target.at is not None
            to = max(start, await probe.first_at_or_after(tp, _ms(target.at), hw))
        s = stored.get((topic, tp.partition))
        moves.append(Move(topic, tp.partition, s.next_offset if s is not None else None, to))
    return moves


async def reset(
    conn: asyncpg.Connection,
    bootstrap: str,
    kafka_options: Mapping[str, Any],
    group: str,
    topic: str,
    partitions: Sequence[int] | None,
    target: Target,
    *,
    dry_run: bool = False,
    force: bool = False,
) -> ResetResult:
    """Move ``group``'s stored positions of ``topic`` (all or ``partitions``) to ``target``.

    Raises ``Refused`` when the group has live members and not ``force`` (unless
    ``dry_run``: the plan is then returned with the members); ``PositionsError`` when the
    target does not exist. With ``dry_run`` nothing is changed.
    """
    members = await group_members(bootstrap, kafka_options, group)
    async with LogProbe(bootstrap, kafka_options) as probe:
        moves = await plan(probe, await positions.load(conn, group), topic, partitions, target)
    result = ResetResult(moves, members)
    if dry_run:
        return result
    if members and not force:
        raise Refused(
            f"group {group} has {len(members)} live member(s) ({', '.join(members)}): stop "
            "the workers (scale to 0) and run again, or add --force to move the positions "
            "under them (see docs/operations.md, positions)"
        )
    before = await positions.move(conn, group, topic, {m.partition: m.to for m in moves})
    result.moves = [Move(m.topic, m.partition, before[m.partition], m.to) for m in moves]
    result.applied = True
    who = f"{_user()}@{socket.gethostname()}"
    for m in result.moves:
        # warning: the operator's record must survive LOG_LEVEL=warning.
        log.warning(
            "positions reset",
            who=who,
            group=group,
            topic=m.topic,
            partition=m.partition,
            target=target.describe(),
            **{"from": m.stored, "to": m.to},
            forced=bool(members) and force,
            live_members=len(members),
        )
    await _commit_to_kafka(bootstrap, kafka_options, group, result)
    return result


async def _commit_to_kafka(
    bootstrap: str, kafka_options: Mapping[str, Any], group: str, result: ResetResult
) -> None:
    consumer = _group_probe(bootstrap, kafka_options, group)
    await positions.start_or_close(consumer)
    try:
        offsets = {
            TopicPartition(m.topic, m.partition): OffsetAndMetadata(m.to, "") for m in result.moves
        }
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
        result.kafka_committed = True
    except KafkaError as exc:
        # Kafka refuses a commit from outside a group that has members; the database holds
        # the truth, and each worker's next stored batch commits its positions again.
        result.kafka_error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        log.warning("kafka offsets not committed", group=group, error=result.kafka_error)
    finally:
        await consumer.stop()


def format_plan(group: str, result: ResetResult, dry_run: bool) -> str:
    """What ``ingest positions reset`` prints."""
    lines = [f"group {group}" + ("  (dry run: nothing changed)" if dry_run else "")]
    if result.members:
        lines.append(f"live members: {', '.join(result.members)}")
        if dry_run:
            lines.append("a reset now is refused unless --force (stop the workers first)")
    for m in result.moves:
        was = "-" if m.stored is None else str(m.stored)
        verb = "would move" if dry_run else "moved"
        lines.append(f"{m.topic}/{m.partition}: {verb} {was} -> {m.to}")
    if result.applied:
        lines.append(
            "kafka committed offsets: "
            + ("moved" if result.kafka_committed else f"not moved ({result.kafka_error})")
        )
    return "\n".join(lines)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        return f"uid {os.getuid()}"


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)
