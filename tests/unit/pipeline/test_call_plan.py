"""What a batch does to calls, worked out in memory before any SQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson

from ingest.pipeline.contract import CallEvent, RecordRef, decode
from ingest.pipeline.sink import CallPlan

T0 = datetime(2026, 5, 1, tzinfo=UTC)


def ev(call: uuid.UUID, kind: str, at_s: float, **data: object) -> CallEvent:
    if kind == "initiation":
        data = {"from_number": "+15550001", "to_number": "+15550002", **data}
    raw = orjson.dumps(
        {
            "call_id": str(call),
            "event_type": kind,
            "event_data": data,
            "created_at": (T0 + timedelta(seconds=at_s)).isoformat(),
        }
    )
    out = decode(raw, RecordRef("t", 0, int(at_s * 1000)), None)
    assert isinstance(out, CallEvent)
    return out


def test_a_call_begun_and_ended_in_the_batch_is_written_once_in_its_final_state() -> None:
    c = uuid.uuid4()
    plan = CallPlan.of(
        [ev(c, "initiation", 0), ev(c, "answer", 2), ev(c, "termination", 62, cost_cents=9)],
        existing_calls=set(),
    )
    (row,) = plan.new_call_rows()
    assert row[4] == "completed"
    assert row[7] == T0 + timedelta(seconds=62)
    assert row[8] == timedelta(seconds=62)
    assert row[12] == 9
    assert plan.answered == []
    assert plan.terminations == []
    assert plan.terminated_new == 1


def test_an_answer_moves_a_new_call_to_in_progress() -> None:
    c = uuid.uuid4()
    plan = CallPlan.of([ev(c, "initiation", 0), ev(c, "answer", 1)], set())
    assert plan.new_call_rows()[0][4] == "in_progress"


def test_duration_seconds_wins_over_elapsed_time() -> None:
    c = uuid.uuid4()
    plan = CallPlan.of(
        [ev(c, "initiation", 0), ev(c, "termination", 100, duration_seconds=42.5)], set()
    )
    assert plan.new_call_rows()[0][8] == timedelta(seconds=42.5)


def test_the_first_termination_wins_and_a_later_answer_changes_nothing() -> None:
    c = uuid.uuid4()
    plan = CallPlan.of(
        [
            ev(c, "initiation", 0),
            ev(c, "termination", 5, status="failed"),
            ev(c, "answer", 6),
            ev(c, "termination", 7, status="completed"),
        ],
        set(),
    )
    row = plan.new_call_rows()[0]
    assert row[4] == "failed"
    assert row[7] == T0 + timedelta(seconds=5)


def test_existing_calls_are_updated_not_inserted() -> None:
    c = uuid.uuid4()
    plan = CallPlan.of(
        [
            ev(c, "initiation", 0),
            ev(c, "answer", 1),
            ev(c, "termination", 2),
            ev(c, "termination", 3),
        ],
        existing_calls={c},
    )
    assert plan.new_calls == {}
    assert plan.answered == [c]
    assert [e.created_at for e in plan.terminations] == [T0 + timedelta(seconds=2)]


def test_agents_last_used_is_the_latest_initiation() -> None:
    a = uuid.uuid4()
    plan = CallPlan.of(
        [
            ev(uuid.uuid4(), "initiation", 10, agent_id=str(a)),
            ev(uuid.uuid4(), "initiation", 5, agent_id=str(a)),
        ],
        set(),
    )
    assert plan.agents_used == {a: T0 + timedelta(seconds=10)}
