"""Dead letters carry their source coordinates and the reason in Kafka headers."""

from __future__ import annotations

from ingest.pipeline.contract import RecordRef
from ingest.pipeline.deadletter import (
    DB_REJECTED,
    H_DETAIL,
    H_OFFSET,
    H_PARTITION,
    H_REASON,
    H_SQLSTATE,
    H_TOPIC,
    MAX_DETAIL_CHARS,
    DeadLetter,
    header_map,
)

REF = RecordRef("call-events", 7, 123456789)


def letter(detail: str = "call_id: Field required", sqlstate: str | None = None) -> DeadLetter:
    reason = DB_REJECTED if sqlstate else "invalid_event"
    return DeadLetter(REF, b"key", b"value", reason, detail, sqlstate)


def test_headers_name_reason_detail_and_source() -> None:
    assert letter().headers() == [
        ("x-ingest-reason", b"invalid_event"),
        ("x-ingest-detail", b"call_id: Field required"),
        ("x-ingest-source-topic", b"call-events"),
        ("x-ingest-source-partition", b"7"),
        ("x-ingest-source-offset", b"123456789"),
    ]


def test_header_values_are_bytes() -> None:
    headers = letter(sqlstate="23514").headers()

    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)


def test_sqlstate_header_only_when_given() -> None:
    assert H_SQLSTATE not in dict(letter().headers())


def test_sqlstate_header_when_given() -> None:
    headers = dict(letter(sqlstate="23514").headers())

    assert headers[H_SQLSTATE] == b"23514"
    assert headers[H_REASON] == DB_REJECTED.encode()


def test_detail_of_max_length_is_kept_whole() -> None:
    detail = "x" * MAX_DETAIL_CHARS

    assert dict(letter(detail).headers())[H_DETAIL] == detail.encode()


def test_long_detail_is_truncated_to_1000_chars() -> None:
    sent = dict(letter("x" * 5000).headers())[H_DETAIL].decode()

    assert MAX_DETAIL_CHARS == 1000
    assert len(sent) == 1000
    assert sent.endswith("...")


def test_truncation_counts_characters_not_bytes() -> None:
    sent = dict(letter("é" * 1500).headers())[H_DETAIL].decode("utf-8")

    assert len(sent) == 1000
    assert sent == "é" * 997 + "..."


def test_detail_that_is_not_encodable_is_replaced_not_raised() -> None:
    sent = dict(letter("bad \ud800 char").headers())[H_DETAIL]

    assert sent == b"bad ? char"


def test_header_map_decodes_headers_for_readers() -> None:
    decoded = header_map(letter(sqlstate="23503").headers())

    assert decoded == {
        H_REASON: DB_REJECTED,
        H_DETAIL: "call_id: Field required",
        H_TOPIC: "call-events",
        H_PARTITION: "7",
        H_OFFSET: "123456789",
        H_SQLSTATE: "23503",
    }


def test_header_map_last_header_wins() -> None:
    assert header_map([("a", b"1"), ("a", b"2")]) == {"a": "2"}
