"""The event contract: what a Kafka record must hold to become a ``call_events`` row.

Pure functions only: bytes and record coordinates in, a ``CallEvent`` or a
``Rejection`` (with a reason code and a readable detail) out. Nothing here does I/O.
"""

from __future__ import annotations

import functools
import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, NamedTuple, cast

import orjson
from asyncpg.pgproto.pgproto import UUID as FastUUID
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    Strict,
    TypeAdapter,
    ValidationError,
)

EVENT_TYPES: Final = ("initiation", "answer", "transcription", "response", "error", "termination")
EventType = Literal["initiation", "answer", "transcription", "response", "error", "termination"]

# Dead-letter reasons decided here; the sink adds unknown_call, unknown_agent and db_rejected.
INVALID_JSON: Final = "invalid_json"
INVALID_EVENT: Final = "invalid_event"

# Event ids derived from a record's coordinates live in their own namespace, so the same
# (topic, partition, offset) always yields the same id and a redelivery maps to the same row.
EVENT_ID_NAMESPACE: Final = uuid.UUID("6b1f0c52-5c1e-4f57-9a51-4c0f2d7a9e10")

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)
# Same language as the seed's valid_phone_numbers, with ASCII digits only: Python's \d also
# matches other scripts' digits, which the CHECK may not.
E164_PATTERN: Final = r"^\+[1-9][0-9]{1,14}$"
INT4_MAX: Final = 2**31 - 1
STATUS_MAX_LENGTH: Final = 50  # calls.status is VARCHAR(50)
MAX_DURATION_S: Final = 10 * 365 * 24 * 3600.0


def _require_str(v: Any) -> Any:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    if "\x00" in v:
        raise ValueError("must not contain NUL (\\u0000)")
    return v


def _parse_timestamp(v: Any) -> Any:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    m = _RFC3339.match(v)
    if m is None:
        raise ValueError("must be an RFC 3339 timestamp with a time zone")
    frac = m.group(1)
    if frac is not None and len(frac) > 7:
        # Python keeps microseconds; cut nanoseconds rather than refuse them.
        v = v[: m.start(1) + 7] + v[m.end(1) :]
    if v[-1] == "z":
        v = v[:-1] + "Z"
    try:
        ts = datetime.fromisoformat(v)
        ts.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"not a valid timestamp: {exc}") from None
    return ts


def _plain_timestamp(v: str) -> datetime | None:
    """The time of an RFC 3339 string in one of the shapes producers send (seconds or
    microseconds, ``Z`` or a ``+HH:MM`` offset, an upper-case ``T``), parsed without the
    regex; None for any other shape, or a year at the edge of the range (``_parse_timestamp``
    then decides). With the separators in place, ``fromisoformat`` accepts exactly ASCII
    digits everywhere else: the language of ``_RFC3339`` for these shapes."""
    n = len(v)
    if not (
        (n == 32 and v[19] == "." and v[26] in "+-" and v[29] == ":")
        or (n == 20 and v[19] == "Z")
        or (n == 27 and v[19] == "." and v[26] == "Z")
        or (n == 25 and v[19] in "+-" and v[22] == ":")
    ) or not (v[4] == v[7] == "-" and v[10] == "T" and v[13] == v[16] == ":"):
        return None
    try:
        ts = datetime.fromisoformat(v)
    except ValueError:
        return None
    # Year 1 or 9999 with an offset may not convert to UTC: the full check rejects those.
    return ts if 1 < ts.year < 9999 else None


def _finite(v: float | None) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError("must be finite")
    return v


UuidStr = Annotated[uuid.UUID, BeforeValidator(_require_str)]
Timestamp = Annotated[AwareDatetime, BeforeValidator(_parse_timestamp)]
Text = Annotated[str, Strict(), BeforeValidator(_require_str)]
PhoneNumber = Annotated[Text, Field(pattern=E164_PATTERN, max_length=16)]


class InitiationFields(BaseModel):
    """What an ``initiation`` carries into its new ``calls`` row."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    from_number: PhoneNumber
    to_number: PhoneNumber
    agent_id: UuidStr | None = None


class TerminationFields(BaseModel):
    """What a ``termination`` may set on its ``calls`` row; absent means unchanged."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    status: Annotated[Text, Field(min_length=1, max_length=STATUS_MAX_LENGTH)] = "completed"
    duration_seconds: (
        Annotated[float, Strict(), Field(ge=0, le=MAX_DURATION_S, allow_inf_nan=False)] | None
    ) = None
    recording_url: Text | None = None
    transcript: Text | None = None
    sentiment_score: Annotated[float, Strict(), Field(allow_inf_nan=False)] | None = None
    cost_cents: Annotated[int, Strict(), Field(ge=0, le=INT4_MAX)] | None = None


class CallEventMessage(BaseModel):
    """The JSON object a producer publishes (exported as ``schema/call_event.schema.json``).

    The call fields (``from_number`` ... ``cost_cents``) may stand at the top level or
    inside ``event_data``; a top-level value wins. They are checked only for the event
    types that use them.
    """

    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        title="CallEvent",
        json_schema_extra={"additionalProperties": True},
    )

    id: UuidStr | None = Field(
        default=None,
        description="Event UUID. When absent: UUIDv5 of (topic, partition, offset).",
    )
    call_id: UuidStr
    event_type: EventType
    event_data: dict[str, JsonValue]
    created_at: Timestamp | None = Field(
        default=None,
        description="Event time, RFC 3339 with a time zone. When absent: the record timestamp.",
    )
    from_number: PhoneNumber | None = None
    to_number: PhoneNumber | None = None
    agent_id: UuidStr | None = None
    status: Annotated[Text, Field(min_length=1, max_length=STATUS_MAX_LENGTH)] | None = None
    duration_seconds: Annotated[float, Field(ge=0, le=MAX_DURATION_S)] | None = None
    recording_url: Text | None = None
    transcript: Text | None = None
    sentiment_score: float | None = None
    cost_cents: Annotated[int, Field(ge=0, le=INT4_MAX)] | None = None


class Initiation(NamedTuple):
    """An initiation's validated call fields (``InitiationFields``' values): a named tuple,
    since building the pydantic model cost more than all other checks of the event."""

    from_number: str
    to_number: str
    agent_id: uuid.UUID | None = None


class Termination(NamedTuple):
    """A termination's validated call fields (``TerminationFields``' values)."""

    status: str = "completed"
    duration_seconds: float | None = None
    recording_url: str | None = None
    transcript: str | None = None
    sentiment_score: float | None = None
    cost_cents: int | None = None


_ENVELOPE_KEYS: Final = frozenset({"id", "call_id", "event_type", "event_data", "created_at"})
_INITIATION_KEYS: Final = tuple(InitiationFields.model_fields)
_TERMINATION_KEYS: Final = tuple(TerminationFields.model_fields)


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: UuidStr | None = None
    call_id: UuidStr
    event_type: EventType
    event_data: dict[str, Any]
    created_at: Timestamp | None = None


_envelope: Final = TypeAdapter(_Envelope)
_initiation: Final = TypeAdapter(InitiationFields)
_termination: Final = TypeAdapter(TerminationFields)


class RecordRef(NamedTuple):
    """Where a record came from; also what a redelivery has in common with the original.

    A named tuple, not a dataclass: one is made per consumed record, and a frozen
    dataclass's ``__init__`` cost several times more."""

    topic: str
    partition: int
    offset: int


class CallEvent(NamedTuple):
    """A validated event, ready for the database: every value fits its column.

    A named tuple, like ``RecordRef``: one is made per consumed record. Its first five
    fields are the ``call_events`` row, in the sink's COPY column order."""

    id: uuid.UUID
    call_id: uuid.UUID
    event_type: str
    event_data_json: str
    created_at: datetime
    ref: RecordRef
    initiation: Initiation | None = None
    termination: Termination | None = None


# A named tuple's constructor is a Python function (its generated ``__new__``): the plain
# path builds its tuples with ``tuple.__new__`` instead, every field given in order (300 ->
# 130 ns for a RecordRef; one CallEvent and one RecordRef per record, more for initiations
# and terminations).
new_tuple: Final = tuple.__new__


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record cannot be stored: a short reason code and the first error, readable."""

    reason: str
    detail: str


def derive_event_id(ref: RecordRef) -> uuid.UUID:
    """The deterministic id of an event published without one."""
    return uuid.uuid5(EVENT_ID_NAMESPACE, f"{ref.topic}/{ref.partition}/{ref.offset}")


def contains_nul(value: Any) -> bool:
    """True when a NUL character stands in any string or key of a decoded JSON value."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or contains_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(contains_nul(v) for v in value)
    return False


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"]) or "value"
    return f"{loc}: {err['msg']}"


def decode(value: bytes | None, ref: RecordRef, timestamp_ms: int | None) -> CallEvent | Rejection:
    """Decode and validate one record's value.

    ``timestamp_ms`` is the Kafka record timestamp, used when the event has no ``created_at``.
    """
    if value is None:
        return Rejection(INVALID_JSON, "record has no value (tombstone)")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Rejection(INVALID_JSON, f"not JSON: {exc}")
    if not isinstance(obj, dict):
        return Rejection(INVALID_EVENT, f"value: must be a JSON object, got {type(obj).__name__}")
    plain = _decode_plain(obj, value, ref)
    if plain is not None:
        return plain
    return decode_by_model(obj, value, ref, timestamp_ms)


def decode_by_model(
    obj: dict[str, Any], value: bytes, ref: RecordRef, timestamp_ms: int | None
) -> CallEvent | Rejection:
    """Validate a decoded JSON object with the envelope model: every case, every detail.

    ``decode`` takes this path for whatever its plain-case check does not accept."""
    try:
        env = _envelope.validate_python(obj)
    except ValidationError as exc:
        return Rejection(INVALID_EVENT, _first_error(exc))
    # PostgreSQL refuses NUL in text and jsonb; the escape is rare, so only then walk the data.
    if b"\\u0000" in value and contains_nul(env.event_data):
        return Rejection(INVALID_EVENT, "event_data: must not contain NUL (\\u0000)")

    created_at = env.created_at
    if created_at is None:
        if timestamp_ms is None or timestamp_ms < 0:
            return Rejection(INVALID_EVENT, "created_at: absent and the record has no timestamp")
        try:
            created_at = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
        except (ValueError, OverflowError, OSError):
            return Rejection(
                INVALID_EVENT,
                f"created_at: absent, and the record timestamp {timestamp_ms} is out of range",
            )

    initiation: Initiation | None = None
    termination: Termination | None = None
    try:
        if env.event_type == "initiation":
            initiation = _initiation_of(_call_fields(obj, env, _INITIATION_KEYS))
        elif env.event_type == "termination":
            termination = _termination_of(_call_fields(obj, env, _TERMINATION_KEYS))
    except ValidationError as exc:
        return Rejection(INVALID_EVENT, _first_error(exc))

    return CallEvent(
        id=env.id if env.id is not None else derive_event_id(ref),
        call_id=env.call_id,
        event_type=env.event_type,
        event_data_json=orjson.dumps(env.event_data).decode(),
        created_at=created_at,
        ref=ref,
        initiation=initiation,
        termination=termination,
    )


def _initiation_of(fields: dict[str, Any]) -> Initiation:
    m = _initiation.validate_python(fields)
    return Initiation(m.from_number, m.to_number, m.agent_id)


def _termination_of(fields: dict[str, Any]) -> Termination:
    m = _termination.validate_python(fields)
    return Termination(
        m.status,
        m.duration_seconds,
        m.recording_url,
        m.transcript,
        m.sentiment_score,
        m.cost_cents,
    )


# E164_PATTERN for re.fullmatch: with "$", Python's re also matches before a final newline.
_E164_FULL: Final = re.compile(E164_PATTERN.removeprefix("^").removesuffix("$"))


def _plain_initiation(data: dict[str, Any]) -> Initiation | None:
    """An initiation's call fields in their plain form (E.164 strings, no agent or a
    canonical UUID), checked without the model; None for anything else (the model then
    decides). Only for fields that all stand in ``event_data``."""
    frm, to, agent = data.get("from_number"), data.get("to_number"), data.get("agent_id")
    if (
        type(frm) is not str
        or type(to) is not str
        or _E164_FULL.fullmatch(frm) is None
        or _E164_FULL.fullmatch(to) is None
    ):
        return None
    if agent is None:
        return new_tuple(Initiation, (frm, to, None))
    aid = _canonical_uuid(agent) if type(agent) is str else None
    return new_tuple(Initiation, (frm, to, aid)) if aid is not None else None


def _plain_termination(data: dict[str, Any]) -> Termination | None:
    """A termination's call fields in their plain form (strings, JSON floats, an int), each
    within the model's bounds, checked without the model; None for anything else."""
    status = data.get("status", "completed")
    duration, url, transcript = (
        data.get("duration_seconds"),
        data.get("recording_url"),
        data.get("transcript"),
    )
    sentiment, cost = data.get("sentiment_score"), data.get("cost_cents")
    if (
        type(status) is not str
        or not 1 <= len(status) <= STATUS_MAX_LENGTH
        or (
            duration is not None
            and (type(duration) is not float or not 0 <= duration <= MAX_DURATION_S)
        )
        or (url is not None and type(url) is not str)
        or (transcript is not None and type(transcript) is not str)
        or (
            sentiment is not None and (type(sentiment) is not float or not math.isfinite(sentiment))
        )
        or (cost is not None and (type(cost) is not int or not 0 <= cost <= INT4_MAX))
    ):
        return None
    return new_tuple(Termination, (status, duration, url, transcript, sentiment, cost))


def _call_fields(obj: dict[str, Any], env: _Envelope, keys: tuple[str, ...]) -> dict[str, Any]:
    return _merged_fields(obj, env.event_data, keys)


def _merged_fields(
    obj: dict[str, Any], event_data: dict[str, Any], keys: tuple[str, ...]
) -> dict[str, Any]:
    fields = {k: event_data[k] for k in keys if k in event_data}
    fields.update({k: obj[k] for k in keys if k in obj and k not in _ENVELOPE_KEYS})
    return fields


def _canonical_uuid(v: str) -> uuid.UUID | None:
    """The UUID of a canonical 8-4-4-4-12 hex string; None for any other form."""
    if len(v) != 36 or v[8] != "-" or v[13] != "-" or v[18] != "-" or v[23] != "-":
        return None
    try:
        # asyncpg's C UUID (a uuid.UUID subclass, equal and hashing alike): parsing with
        # uuid.UUID cost more than the rest of a plain event's checks together.
        return cast(uuid.UUID, FastUUID(v))
    except ValueError:
        return None


# The call ids decoded lately, by their text: a call's events (about six) then share one
# UUID object, parsed once, whose hash (an int built on first use) the sink's sets and
# dicts of call ids compute once per call instead of once per event. A hit costs about what
# a dict lookup does (70 ns, against 250 ns for the parse).
CALL_IDS_KEPT: Final = 16_384
_call_uuid = functools.lru_cache(maxsize=CALL_IDS_KEPT)(_canonical_uuid)


# A NUL can stand in JSON text only as the escape ``\u0000``, and most events hold no
# backslash at all: the search for that byte (an int operand: memchr; 53 ns over a 257-byte
# bench event) spares the search for the six-byte escape (511 ns).
_BACKSLASH: Final = ord("\\")


def _decode_plain(obj: dict[str, Any], value: bytes, ref: RecordRef) -> CallEvent | None:
    """The common case, checked without the envelope model: every envelope field present
    in its plain form (canonical UUID strings, a known event type, an object, an RFC 3339
    string). Returns None whenever anything is otherwise, and ``decode`` then takes the
    model path, which accepts and rejects exactly as before with the same details: this
    path only ever accepts what that one accepts, with the same values."""
    call_id, event_type, data, created = (
        obj.get("call_id"),
        obj.get("event_type"),
        obj.get("event_data"),
        obj.get("created_at"),
    )
    if (
        type(call_id) is not str
        or type(event_type) is not str
        or type(data) is not dict
        or type(created) is not str
        or event_type not in EVENT_TYPES
        or (_BACKSLASH in value and b"\\u0000" in value)
    ):
        return None
    raw_id = obj.get("id")
    if raw_id is None:
        eid: uuid.UUID | None = derive_event_id(ref)
    elif type(raw_id) is str:
        eid = _canonical_uuid(raw_id)
    else:
        return None
    cid = _call_uuid(call_id)
    if eid is None or cid is None:
        return None
    try:
        created_at = _plain_timestamp(created) or _parse_timestamp(created)
        initiation = termination = None
        if event_type == "initiation":
            initiation = (
                _plain_initiation(data) if obj.keys().isdisjoint(_INITIATION_KEYS) else None
            ) or _initiation_of(_merged_fields(obj, data, _INITIATION_KEYS))
        elif event_type == "termination":
            termination = (
                _plain_termination(data) if obj.keys().isdisjoint(_TERMINATION_KEYS) else None
            ) or _termination_of(_merged_fields(obj, data, _TERMINATION_KEYS))
    except (ValueError, ValidationError):
        return None
    return new_tuple(
        CallEvent,
        (
            eid,
            cid,
            event_type,
            orjson.dumps(data).decode(),
            created_at,
            ref,
            initiation,
            termination,
        ),
    )


def json_schema() -> dict[str, Any]:
    """The contract as JSON Schema (draft 2020-12), as exported to ``schema/``."""
    schema = CallEventMessage.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = (
        "One call-lifecycle event, published as the UTF-8 JSON value of a Kafka record "
        "keyed by call_id. initiation requires from_number and to_number (E.164)."
    )
    return schema
