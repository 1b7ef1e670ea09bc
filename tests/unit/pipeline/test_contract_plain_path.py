"""The plain-case shortcut in ``decode`` must decide exactly as the envelope model does."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pipeline import contract
from ingest.pipeline.contract import (
    CALL_IDS_KEPT,
    INT4_MAX,
    MAX_DURATION_S,
    CallEvent,
    RecordRef,
    decode,
    decode_by_model,
)

REF = RecordRef("calls", 2, 41)
U = "08d0323c-08ab-4715-9caa-0c48340252a6"

uuids = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.uuids().map(lambda u: "urn:uuid:" + str(u)),
    st.just(U.replace("-", "", 1) + "-"),
    st.just(U[:35] + "g"),
    st.just(U[:8] + "-" + U[9:13] + "x" + U[14:]),
    st.just(U + " "),
    st.just("\x00" + U[1:]),
    st.just(""),
    st.integers(-(2**63), 2**63 - 1),
    st.none(),
)
timestamps = st.one_of(
    st.just("2026-03-01T12:00:00Z"),
    st.just("2026-03-01T12:00:00.123456789+02:00"),
    st.just("2026-03-01 12:00:00z"),
    st.just("2026-03-01T12:00:00"),
    st.just("2026-02-30T12:00:00Z"),
    st.just("9999-12-31T23:59:59-23:59"),
    st.just("0001-01-01T00:00:00+01:00"),
    # The shapes the regex-free path parses, and near misses of them.
    st.just("2026-03-01T12:00:00.123456+00:00"),
    st.just("2026-03-01T12:00:00.123456Z"),
    st.just("2026-03-01T12:00:00+05:30"),
    st.just("2026-03-01T12:00:00.12345\u0663+00:00"),
    st.just("2026-03-01T12:00:00.123456+24:00"),
    st.just("2026-13-01T12:00:00Z"),
    st.just("+026-03-01T12:00:00Z"),
    st.just("9999-12-31T23:59:59.999999-01:00"),
    st.just("0001-01-01T00:00:00.000000+01:00"),
    st.builds(
        lambda chars, shape: "".join(c if c != "#" else chars.pop() for c in shape),
        st.lists(st.sampled_from("0123456789+-:.TZ \u0663"), min_size=24, max_size=24),
        st.sampled_from(
            [
                "####-##-##T##:##:##.######+##:##",
                "####-##-##T##:##:##Z",
                "####-##-##T##:##:##-##:##",
            ]
        ),
    ),
    st.text(max_size=8),
    st.integers(-(2**63), 2**63 - 1),
    st.none(),
)
phones = st.one_of(
    st.just("+15550001"), st.just("15550001"), st.just("+٣٣٣"), st.integers(-(2**63), 2**63 - 1)
)
call_fields = st.dictionaries(
    st.sampled_from(
        [
            "from_number",
            "to_number",
            "agent_id",
            "status",
            "duration_seconds",
            "recording_url",
            "transcript",
            "sentiment_score",
            "cost_cents",
            "text",
        ]
    ),
    st.one_of(
        phones,
        uuids,
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(-5, 2**32),
        st.text(max_size=5),
        st.none(),
    ),
    max_size=5,
)
MISSING = object()


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, values in (
        ("id", uuids),
        ("call_id", uuids),
        ("event_type", st.sampled_from(["initiation", "answer", "termination", "error", "x", 3])),
        ("event_data", st.one_of(call_fields, st.lists(st.integers(-9, 9), max_size=2), st.none())),
        ("created_at", timestamps),
    ):
        v = draw(st.one_of(st.just(MISSING), values) if draw(st.booleans()) else values)
        if v is not MISSING:
            obj[key] = v
    obj.update(draw(call_fields))
    return obj


@settings(max_examples=400, deadline=None)
@given(events(), st.one_of(st.none(), st.integers(-1, 2**45)))
def test_decode_agrees_with_the_envelope_model_on_any_object(obj: dict[str, Any], ts: Any) -> None:
    value = orjson.dumps(obj)
    assert decode(value, REF, ts) == decode_by_model(orjson.loads(value), value, REF, ts)


def test_a_nul_escape_anywhere_takes_the_model_path_and_is_refused() -> None:
    obj = {
        "id": U,
        "call_id": U,
        "event_type": "answer",
        "event_data": {"t": "a\x00b"},
        "created_at": "2026-03-01T12:00:00Z",
    }
    value = orjson.dumps(obj)
    assert decode(value, REF, None) == decode_by_model(obj, value, REF, None)
    assert not isinstance(decode(value, REF, None), CallEvent)


def test_a_plain_event_decodes_to_the_same_values_as_the_model() -> None:
    obj = {
        "id": U,
        "call_id": str(uuid.uuid4()),
        "event_type": "initiation",
        "event_data": {"from_number": "+15550001", "to_number": "+15550002", "n": [1, 2]},
        "created_at": "2026-03-01T12:00:00.5+02:00",
    }
    value = orjson.dumps(obj)
    fast = decode(value, REF, None)
    assert isinstance(fast, CallEvent)
    assert fast == decode_by_model(obj, value, REF, None)
    assert fast.id == uuid.UUID(U)
    assert hash(fast.id) == hash(uuid.UUID(U))


# Per call field: values the model accepts, and values at or past its bounds or of another
# type, so that most drawn events reach the plain checks and each bound is met often.
_BAD = [None, True, 0, 1.5, "", [], {}]
CALL_FIELD_VALUES: dict[str, tuple[list[Any], list[Any]]] = {
    "from_number": (
        ["+15550001", "+123456789012345", "+12"],
        ["+1", "+1234567890123456", "+05550001", "+15550001\n", " +15550001", "+1555\u0663"],
    ),
    "to_number": (["+15550002"], ["15550002", "+15550002\n"]),
    "agent_id": ([U, U.upper(), None], ["{" + U + "}", U.replace("-", ""), "urn:uuid:" + U]),
    "status": (["completed", "x" * 50, "y"], ["x" * 51]),
    "duration_seconds": (
        [0.0, -0.0, 1.5, MAX_DURATION_S, None],
        [-0.5, -1.5, MAX_DURATION_S * 1.0000001, 1e308, 0, 60, False],
    ),
    "recording_url": (["https://r.example/1.wav", None], [1]),
    "transcript": (["hello", None], [1.0]),
    "sentiment_score": ([-0.5, 0.0, 0.75, None], [0, 1, 1e308]),
    "cost_cents": ([0, 197, INT4_MAX, None], [-1, INT4_MAX + 1, 2**64 - 1, 1.0, True]),
}


@st.composite
def call_fields_near_bounds(draw: st.DrawFn) -> dict[str, Any]:
    """Each call field absent, valid, or at or past a bound (a third of the time each)."""
    fields: dict[str, Any] = {}
    for key, (good, bad) in CALL_FIELD_VALUES.items():
        kind = draw(st.sampled_from(["absent", "good", "bad"]))
        if kind != "absent":
            fields[key] = draw(st.sampled_from(good if kind == "good" else bad + _BAD))
    return fields


@st.composite
def plain_call_events(draw: st.DrawFn) -> dict[str, Any]:
    """Events whose envelope is plain, so that only their call fields decide the path;
    now and then a call field at the top level as well."""
    obj: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "call_id": U,
        "event_type": draw(st.sampled_from(["initiation", "termination"])),
        "event_data": {**draw(call_fields_near_bounds()), "note": "kept"},
        "created_at": "2026-03-01T12:00:00.123456+00:00",
    }
    if draw(st.integers(0, 3)) == 0:
        obj.update(draw(call_fields_near_bounds()))
    return obj


@settings(max_examples=2000, deadline=None)
@given(plain_call_events())
def test_decode_agrees_with_the_models_on_any_call_fields(obj: dict[str, Any]) -> None:
    value = orjson.dumps(obj)
    assert decode(value, REF, None) == decode_by_model(orjson.loads(value), value, REF, None)


def _plain(call_id: str, event_type: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "call_id": call_id,
        "event_type": event_type,
        "event_data": {},
        "created_at": "2026-03-01T12:00:00Z",
    }


def test_the_events_of_one_call_share_one_call_id_object() -> None:
    cid = str(uuid.uuid4())
    a, b = (decode(orjson.dumps(_plain(cid, t)), REF, 0) for t in ("answer", "transcription"))
    assert isinstance(a, CallEvent)
    assert isinstance(b, CallEvent)
    assert a.call_id is b.call_id
    assert a.call_id == uuid.UUID(cid)


def test_the_call_ids_kept_for_sharing_are_bounded() -> None:
    for _ in range(CALL_IDS_KEPT + 10):
        decode(orjson.dumps(_plain(str(uuid.uuid4()), "answer")), REF, 0)
    assert contract._call_uuid.cache_info().currsize == CALL_IDS_KEPT
