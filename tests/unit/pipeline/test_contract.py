"""The event contract: which Kafka record values become events, and why the others do not."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pipeline.contract import (
    EVENT_TYPES,
    INT4_MAX,
    INVALID_EVENT,
    INVALID_JSON,
    CallEvent,
    RecordRef,
    Rejection,
    decode,
    derive_event_id,
)

REF = RecordRef("call-events", 3, 42)
CALL_ID = "0b0b0b0b-0000-4000-8000-000000000001"
EVENT_ID = "5e5e5e5e-0000-4000-8000-000000000002"
AGENT_ID = "a9e1a9e1-0000-4000-8000-000000000003"
FROM = "+14155550100"
TO = "+442071838750"
RECORD_TS_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z
RECORD_TS = datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)

# Event types whose event_data carries no call fields, so any object is valid for them.
FREE_FORM_TYPES = ("answer", "transcription", "response", "error")


def message(event_type: str = "answer", **fields: Any) -> dict[str, Any]:
    """A valid message of ``event_type``; ``fields`` add to or replace its keys."""
    msg: dict[str, Any] = {"call_id": CALL_ID, "event_type": event_type, "event_data": {}}
    if event_type == "initiation":
        msg["event_data"] = {"from_number": FROM, "to_number": TO}
    msg.update(fields)
    return msg


def encode(obj: Any) -> bytes:
    return orjson.dumps(obj)


def accept(obj: Any, *, ref: RecordRef = REF, timestamp_ms: int | None = RECORD_TS_MS) -> CallEvent:
    value = obj if isinstance(obj, bytes) else encode(obj)
    result = decode(value, ref, timestamp_ms)
    assert isinstance(result, CallEvent), result
    return result


def reject(obj: Any, *, ref: RecordRef = REF, timestamp_ms: int | None = RECORD_TS_MS) -> Rejection:
    value = obj if obj is None or isinstance(obj, bytes) else encode(obj)
    result = decode(value, ref, timestamp_ms)
    assert isinstance(result, Rejection), result
    return result


def other_digits(zero: int, ascii_digits: str) -> str:
    """``ascii_digits`` written in the script whose digit zero is ``chr(zero)``."""
    return "".join(chr(zero + int(c)) for c in ascii_digits)


def assert_invalid_field(result: Rejection, field: str) -> None:
    """An ``invalid_event`` whose detail is one readable line that starts with the field."""
    assert result.reason == INVALID_EVENT
    assert result.detail.startswith(f"{field}: "), result.detail
    assert "\n" not in result.detail
    assert "pydantic.dev" not in result.detail


# --- accepted events ------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_decodes(event_type: str) -> None:
    msg = message(event_type, id=EVENT_ID, created_at="2024-05-01T12:00:00Z")
    msg["event_data"] = {**msg["event_data"], "note": "hello"}

    event = accept(msg)

    assert event.id == uuid.UUID(EVENT_ID)
    assert event.call_id == uuid.UUID(CALL_ID)
    assert event.event_type == event_type
    assert orjson.loads(event.event_data_json) == msg["event_data"]
    assert event.created_at == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert event.ref == REF
    assert (event.initiation is not None) == (event_type == "initiation")
    assert (event.termination is not None) == (event_type == "termination")


def test_extra_top_level_keys_are_ignored() -> None:
    event = accept(message("answer", producer="dialer-7", version=3))

    assert orjson.loads(event.event_data_json) == {}


def test_created_at_keeps_its_offset() -> None:
    event = accept(message(created_at="2024-05-01T14:00:00+02:00"))

    assert event.created_at == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert event.created_at.utcoffset() == timedelta(hours=2)


def test_created_at_nanoseconds_are_cut_to_microseconds() -> None:
    event = accept(message(created_at="2024-05-01T12:00:00.123456789Z"))

    assert event.created_at == datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def test_created_at_absent_uses_record_timestamp_in_utc() -> None:
    event = accept(message(), timestamp_ms=RECORD_TS_MS)

    assert event.created_at == RECORD_TS
    assert event.created_at.utcoffset() == timedelta(0)


def test_created_at_present_wins_over_record_timestamp() -> None:
    event = accept(message(created_at="2024-05-01T12:00:00Z"), timestamp_ms=RECORD_TS_MS)

    assert event.created_at == datetime(2024, 5, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize("timestamp_ms", [None, -1])
def test_created_at_absent_without_record_timestamp_is_rejected(
    timestamp_ms: int | None,
) -> None:
    assert_invalid_field(reject(message(), timestamp_ms=timestamp_ms), "created_at")


def test_record_timestamp_out_of_datetime_range_is_rejected_not_raised() -> None:
    # 253402300800000 ms is 10000-01-01T00:00:00Z; producers choose CreateTime freely.
    assert_invalid_field(reject(message(), timestamp_ms=253_402_300_800_000), "created_at")


# --- event ids ------------------------------------------------------------------------------


def test_given_id_is_used() -> None:
    assert accept(message(id=EVENT_ID)).id == uuid.UUID(EVENT_ID)


def test_absent_id_is_derived_from_record_coordinates() -> None:
    event = accept(message())

    assert event.id == derive_event_id(REF)
    assert event.id.version == 5


def test_same_coordinates_derive_the_same_id() -> None:
    first = accept(message(), ref=RecordRef("call-events", 3, 42))
    redelivered = accept(message(), ref=RecordRef("call-events", 3, 42))

    assert first.id == redelivered.id


def test_different_offset_derives_a_different_id() -> None:
    assert derive_event_id(RecordRef("call-events", 3, 42)) != derive_event_id(
        RecordRef("call-events", 3, 43)
    )


def test_different_partition_or_topic_derives_a_different_id() -> None:
    ids = {
        derive_event_id(RecordRef("call-events", 3, 42)),
        derive_event_id(RecordRef("call-events", 4, 42)),
        derive_event_id(RecordRef("other-events", 3, 42)),
    }
    assert len(ids) == 3


def test_id_must_be_a_uuid() -> None:
    assert_invalid_field(reject(message(id="not-a-uuid")), "id")


def test_id_must_be_a_string() -> None:
    assert_invalid_field(reject(message(id=12345)), "id")


# --- not JSON, not an object ----------------------------------------------------------------


def test_tombstone_is_invalid_json() -> None:
    result = reject(None)

    assert result.reason == INVALID_JSON
    assert "tombstone" in result.detail


@pytest.mark.parametrize("value", [b"", b"not json", b'{"call_id": ', b"\xff\xfe{}"])
def test_value_that_is_not_json_is_invalid_json(value: bytes) -> None:
    result = reject(value)

    assert result.reason == INVALID_JSON
    assert result.detail.startswith("not JSON")


def test_raw_nul_byte_in_a_json_string_is_invalid_json() -> None:
    value = b'{"call_id":"%s","event_type":"answer","event_data":{"a":"\x00"}}' % CALL_ID.encode()

    assert reject(value).reason == INVALID_JSON


@pytest.mark.parametrize("value", [b"[]", b"null", b"42", b'"answer"', b"true"])
def test_json_that_is_not_an_object_is_invalid_event(value: bytes) -> None:
    result = reject(value)

    assert result.reason == INVALID_EVENT
    assert result.detail.startswith("value: must be a JSON object")


# --- envelope fields ------------------------------------------------------------------------


def test_call_id_is_required() -> None:
    msg = message()
    del msg["call_id"]

    assert_invalid_field(reject(msg), "call_id")


@pytest.mark.parametrize("call_id", ["not-a-uuid", "", 42, None, [CALL_ID]])
def test_call_id_must_be_a_uuid_string(call_id: Any) -> None:
    assert_invalid_field(reject(message(call_id=call_id)), "call_id")


def test_event_type_is_required() -> None:
    msg = message()
    del msg["event_type"]

    assert_invalid_field(reject(msg), "event_type")


@pytest.mark.parametrize(
    "event_type", ["Answer", "ANSWER", " answer", "answer ", "hangup", "", 1, None]
)
def test_event_type_must_match_exactly(event_type: Any) -> None:
    assert_invalid_field(reject(message(event_type=event_type)), "event_type")


def test_event_data_is_required() -> None:
    msg = message()
    del msg["event_data"]

    assert_invalid_field(reject(msg), "event_data")


@pytest.mark.parametrize("event_data", [None, [], "{}", 1, True])
def test_event_data_must_be_an_object(event_data: Any) -> None:
    assert_invalid_field(reject(message(event_data=event_data)), "event_data")


def _answer_with_number(number: bytes) -> bytes:
    """An answer whose event_data holds ``number`` as written (JSON text, not a Python
    value, so that its digits reach the decoder as given)."""
    return b'{"call_id":"%s","event_type":"answer","event_data":{"n":%s}}' % (
        CALL_ID.encode(),
        number,
    )


def _stored_event_data(number: bytes) -> bytes:
    return accept(_answer_with_number(number)).event_data_json.encode()


@pytest.mark.parametrize(
    "number", [b"-9223372036854775808", b"0", b"9223372036854775807", b"18446744073709551615"]
)
def test_event_data_integers_within_64_bits_are_stored_exactly(number: bytes) -> None:
    assert _stored_event_data(number) == b'{"n":' + number + b"}"


@pytest.mark.parametrize(
    ("number", "stored"),
    [
        (b"18446744073709551616", b"1.8446744073709552e+19"),
        (b"-9223372036854775809", b"-9.223372036854776e+18"),
        (b"123456789012345678901234567890", b"1.2345678901234568e+29"),
        (b"0.10000000000000000001", b"0.1"),
    ],
)
def test_event_data_numbers_beyond_64_bit_integers_are_stored_as_the_nearest_float(
    number: bytes, stored: bytes
) -> None:
    assert _stored_event_data(number) == b'{"n":' + stored + b"}"


def test_event_data_number_beyond_the_float_range_is_invalid_json() -> None:
    rejection = reject(_answer_with_number(b"1e400"))
    assert rejection.reason == INVALID_JSON
    assert "infinity" in rejection.detail


@pytest.mark.parametrize(
    "created_at",
    [
        "2024-05-01T12:00:00",  # no time zone
        "2024-05-01",  # date only
        "yesterday",
        "",
        "2024-02-30T00:00:00Z",  # no such day
        "9999-12-31T23:59:59-01:00",  # beyond year 9999 in UTC
    ],
)
def test_created_at_must_be_rfc3339_with_time_zone(created_at: str) -> None:
    assert_invalid_field(reject(message(created_at=created_at)), "created_at")


@pytest.mark.parametrize("created_at", [1_714_564_800, 1_714_564_800.5, True, {}])
def test_created_at_must_not_be_numeric_or_other_json(created_at: Any) -> None:
    assert_invalid_field(reject(message(created_at=created_at)), "created_at")


# --- NUL ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event_data",
    [
        {"text": "hello\x00world"},
        {"key\x00": "value"},
        {"nested": {"deeper": ["ok", "bad\x00"]}},
        {"nested": [{"k\x00": 1}]},
    ],
)
def test_nul_in_event_data_is_invalid_event(event_data: dict[str, Any]) -> None:
    assert_invalid_field(reject(message(event_data=event_data)), "event_data")


def test_escaped_backslash_u0000_text_is_accepted() -> None:
    # The JSON text "\\u0000" is a backslash followed by "u0000": six harmless characters.
    value = (
        b'{"call_id":"%s","event_type":"answer","event_data":{"text":"a\\\\u0000b"}}'
        % CALL_ID.encode()
    )

    event = accept(value)

    assert orjson.loads(event.event_data_json) == {"text": "a\\u0000b"}


def test_nul_outside_event_data_in_an_ignored_key_is_harmless() -> None:
    event = accept(message(producer="dialer\x00"))

    assert event.event_data_json == "{}"


# --- initiation -----------------------------------------------------------------------------


def test_initiation_takes_numbers_from_event_data() -> None:
    event = accept(message("initiation"))

    assert event.initiation is not None
    assert event.initiation.from_number == FROM
    assert event.initiation.to_number == TO
    assert event.initiation.agent_id is None


def test_initiation_takes_numbers_from_top_level() -> None:
    event = accept(message("initiation", event_data={}, from_number=FROM, to_number=TO))

    assert event.initiation is not None
    assert (event.initiation.from_number, event.initiation.to_number) == (FROM, TO)


def test_initiation_top_level_number_wins_over_event_data() -> None:
    event = accept(message("initiation", from_number="+15550001111"))

    assert event.initiation is not None
    assert event.initiation.from_number == "+15550001111"
    assert event.initiation.to_number == TO


def test_initiation_top_level_value_wins_even_when_invalid() -> None:
    result = reject(message("initiation", from_number="555-0100"))

    assert_invalid_field(result, "from_number")


@pytest.mark.parametrize("missing", ["from_number", "to_number"])
def test_initiation_requires_both_numbers(missing: str) -> None:
    msg = message("initiation")
    del msg["event_data"][missing]

    assert_invalid_field(reject(msg), missing)


@pytest.mark.parametrize(
    "number",
    [
        "14155550100",  # no plus
        "+04155550100",  # leading zero
        "+1",  # too short
        "+1234567890123456",  # 16 digits
        "+1 415 555 0100",
        "+1-415-555-0100",
        "+14155550100\n",
        "",
        14155550100,
    ],
)
def test_initiation_numbers_must_be_e164(number: Any) -> None:
    msg = message("initiation")
    msg["event_data"]["to_number"] = number

    assert_invalid_field(reject(msg), "to_number")


@pytest.mark.parametrize(
    "number",
    [
        "+" + other_digits(0x0660, "14155550100"),  # Arabic-Indic
        "+" + other_digits(0xFF10, "14155550100"),  # full-width
        "+" + other_digits(0x0966, "14155550100"),  # Devanagari
    ],
)
def test_initiation_numbers_must_use_ascii_digits(number: str) -> None:
    msg = message("initiation")
    msg["event_data"]["from_number"] = number

    assert_invalid_field(reject(msg), "from_number")


def test_initiation_accepts_longest_e164_number() -> None:
    msg = message("initiation")
    msg["event_data"]["to_number"] = "+123456789012345"

    assert accept(msg).initiation is not None


def test_initiation_agent_id_is_optional_uuid() -> None:
    msg = message("initiation")
    msg["event_data"]["agent_id"] = AGENT_ID

    event = accept(msg)

    assert event.initiation is not None
    assert event.initiation.agent_id == uuid.UUID(AGENT_ID)


@pytest.mark.parametrize("agent_id", ["agent-7", 7, ""])
def test_initiation_agent_id_must_be_a_uuid(agent_id: Any) -> None:
    msg = message("initiation")
    msg["event_data"]["agent_id"] = agent_id

    assert_invalid_field(reject(msg), "agent_id")


def test_call_fields_are_not_checked_for_other_event_types() -> None:
    event = accept(message("answer", event_data={"from_number": "nope", "cost_cents": "x"}))

    assert event.initiation is None
    assert event.termination is None


# --- termination ----------------------------------------------------------------------------


def test_termination_status_defaults_to_completed() -> None:
    event = accept(message("termination"))

    assert event.termination is not None
    assert event.termination.status == "completed"


def test_termination_takes_fields_from_event_data() -> None:
    data = {
        "status": "failed",
        "duration_seconds": 12.5,
        "recording_url": "https://rec.example/1.wav",
        "transcript": "hello",
        "sentiment_score": -0.25,
        "cost_cents": 17,
    }

    event = accept(message("termination", event_data=data))

    t = event.termination
    assert t is not None
    assert (t.status, t.duration_seconds, t.recording_url) == (
        "failed",
        12.5,
        "https://rec.example/1.wav",
    )
    assert (t.transcript, t.sentiment_score, t.cost_cents) == ("hello", -0.25, 17)


def test_termination_top_level_field_wins_over_event_data() -> None:
    event = accept(message("termination", event_data={"status": "failed"}, status="busy"))

    assert event.termination is not None
    assert event.termination.status == "busy"


def test_termination_status_of_50_chars_is_accepted() -> None:
    event = accept(message("termination", status="x" * 50))

    assert event.termination is not None
    assert event.termination.status == "x" * 50


@pytest.mark.parametrize("status", ["x" * 51, ""])
def test_termination_status_must_be_1_to_50_chars(status: str) -> None:
    assert_invalid_field(reject(message("termination", status=status)), "status")


def test_termination_duration_must_not_be_negative() -> None:
    result = reject(message("termination", event_data={"duration_seconds": -1}))

    assert_invalid_field(result, "duration_seconds")


def test_termination_duration_accepts_integer_seconds() -> None:
    event = accept(message("termination", event_data={"duration_seconds": 30}))

    assert event.termination is not None
    assert event.termination.duration_seconds == 30.0


@pytest.mark.parametrize("duration", ["30", True])
def test_termination_duration_must_be_a_json_number(duration: Any) -> None:
    result = reject(message("termination", event_data={"duration_seconds": duration}))

    assert_invalid_field(result, "duration_seconds")


@pytest.mark.parametrize("score", [True, False])
def test_termination_sentiment_score_must_not_be_bool(score: bool) -> None:
    result = reject(message("termination", event_data={"sentiment_score": score}))

    assert_invalid_field(result, "sentiment_score")


def test_termination_cost_cents_accepts_int4_max() -> None:
    event = accept(message("termination", event_data={"cost_cents": 2**31 - 1}))

    assert event.termination is not None
    assert event.termination.cost_cents == INT4_MAX


@pytest.mark.parametrize("cost", [2**31, -1])
def test_termination_cost_cents_must_fit_int4_and_not_be_negative(cost: int) -> None:
    result = reject(message("termination", event_data={"cost_cents": cost}))

    assert_invalid_field(result, "cost_cents")


@pytest.mark.parametrize("cost", ["12", 12.0, 12.5, True])
def test_termination_cost_cents_must_be_a_json_integer(cost: Any) -> None:
    result = reject(message("termination", event_data={"cost_cents": cost}))

    assert_invalid_field(result, "cost_cents")


@pytest.mark.parametrize("field", ["recording_url", "transcript"])
def test_termination_text_fields_must_be_strings(field: str) -> None:
    result = reject(message("termination", event_data={field: 5}))

    assert_invalid_field(result, field)


# --- properties -----------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
)
# JSON text is UTF-8, so no lone surrogates; orjson could not even encode them.
_utf8 = st.characters(codec="utf-8")
_text_without_nul = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20
)
json_without_nul = st.recursive(
    _scalars | _text_without_nul,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_text_without_nul, children, max_size=4)
    ),
    max_leaves=20,
)
event_data_without_nul = st.dictionaries(_text_without_nul, json_without_nul, max_size=6)

_any_json = st.recursive(
    _scalars | st.text(_utf8, max_size=20),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(_utf8, max_size=10), children, max_size=3)
    ),
    max_leaves=10,
)
_field_names = st.sampled_from(
    [
        "id",
        "call_id",
        "event_type",
        "event_data",
        "created_at",
        "from_number",
        "to_number",
        "agent_id",
        "status",
        "duration_seconds",
        "cost_cents",
        "sentiment_score",
    ]
)
_field_values = (
    _any_json
    | st.sampled_from(EVENT_TYPES)
    | st.just(CALL_ID)
    | st.just("2024-05-01T12:00:00Z")
    | st.just(FROM)
)
_near_messages = st.dictionaries(_field_names, _field_values, max_size=8).map(
    lambda d: encode({**message(), **d})
)
_record_values = st.none() | st.binary(max_size=200) | _near_messages
_record_timestamps = st.none() | st.integers(min_value=-1, max_value=253_402_300_799_999)


@settings(max_examples=200, deadline=None)
@given(value=_record_values, timestamp_ms=_record_timestamps)
def test_decode_never_raises(value: bytes | None, timestamp_ms: int | None) -> None:
    result = decode(value, REF, timestamp_ms)

    assert isinstance(result, CallEvent | Rejection)
    if isinstance(result, Rejection):
        assert result.reason in (INVALID_JSON, INVALID_EVENT)
        assert result.detail


@settings(max_examples=200, deadline=None)
@given(event_type=st.sampled_from(FREE_FORM_TYPES), event_data=event_data_without_nul)
def test_event_data_without_nul_round_trips(event_type: str, event_data: dict[str, Any]) -> None:
    event = accept(message(event_type, event_data=event_data))

    assert orjson.loads(event.event_data_json) == event_data


@st.composite
def _event_data_with_nul(draw: st.DrawFn) -> dict[str, Any]:
    prefix = draw(st.text(_utf8, max_size=5))
    suffix = draw(st.text(_utf8, max_size=5))
    bad = f"{prefix}\x00{suffix}"
    where = draw(st.sampled_from(["value", "key", "nested value", "nested key", "list"]))
    placements: dict[str, dict[str, Any]] = {
        "value": {"text": bad},
        "key": {bad: 1},
        "nested value": {"outer": {"inner": bad}},
        "nested key": {"outer": {bad: None}},
        "list": {"items": [1, "ok", bad]},
    }
    others = draw(event_data_without_nul)
    return {**others, **placements[where]}


@settings(max_examples=200, deadline=None)
@given(event_type=st.sampled_from(EVENT_TYPES), event_data=_event_data_with_nul())
def test_any_nul_in_event_data_is_rejected(event_type: str, event_data: dict[str, Any]) -> None:
    assert_invalid_field(reject(message(event_type, event_data=event_data)), "event_data")
