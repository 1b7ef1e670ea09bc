"""The verdict on a stored position and the record fingerprint (pure)."""

from __future__ import annotations

import pytest

from ingest.pipeline.positions import (
    LogView,
    StoredPosition,
    Verdict,
    fingerprint,
    judge,
    reset_command,
)

FP = fingerprint(1_700_000_000_000, b"call-1", b'{"id": "a"}')


def test_a_fingerprint_changes_with_timestamp_key_and_value():
    assert fingerprint(1_700_000_000_000, b"call-1", b'{"id": "a"}') == FP
    assert fingerprint(1_700_000_000_001, b"call-1", b'{"id": "a"}') != FP
    assert fingerprint(1_700_000_000_000, b"call-2", b'{"id": "a"}') != FP
    assert fingerprint(1_700_000_000_000, b"call-1", b'{"id": "b"}') != FP


def test_a_fingerprint_tells_a_missing_key_from_an_empty_one_and_key_from_value():
    assert fingerprint(0, None, b"v") != fingerprint(0, b"", b"v")
    assert fingerprint(0, b"ab", b"c") != fingerprint(0, b"a", b"bc")


def test_the_same_record_below_the_position_is_ok():
    check = judge(StoredPosition(10, FP), LogView(0, 12, (9, FP)))
    assert check.verdict is Verdict.OK


def test_another_record_below_the_position_is_a_mismatch():
    other = fingerprint(1, b"k", b"v")
    check = judge(StoredPosition(10, FP), LogView(0, 500, (9, other)))
    assert check.verdict is Verdict.MISMATCH
    assert "offset 9" in check.why


@pytest.mark.parametrize("fp", [FP, None])
def test_a_position_beyond_the_log_end_is_a_mismatch_with_or_without_fingerprint(fp):
    check = judge(StoredPosition(10, fp), LogView(0, 3))
    assert check.verdict is Verdict.MISMATCH
    assert "beyond the log end 3" in check.why


def test_a_position_at_the_log_end_without_fingerprint_is_ok():
    assert judge(StoredPosition(10, None), LogView(0, 10)).verdict is Verdict.OK


def test_position_zero_has_nothing_to_compare():
    assert judge(StoredPosition(0, None), LogView(0, 0)).verdict is Verdict.OK


def test_a_position_at_the_log_start_leaves_it_unverified_not_a_gap():
    # Only the record below the position was deleted: nothing that was not stored is gone.
    check = judge(StoredPosition(10, FP), LogView(10, 20))
    assert check.verdict is Verdict.UNVERIFIED
    assert "deleted" in check.why


@pytest.mark.parametrize("fp", [FP, None])
def test_a_position_below_the_log_start_is_a_gap_naming_the_lost_records(fp):
    check = judge(StoredPosition(10, fp), LogView(25, 40))
    assert check.verdict is Verdict.GAP
    assert "records 10 to 24" in check.why


def test_position_zero_below_a_moved_log_start_is_a_gap():
    assert judge(StoredPosition(0, None), LogView(5, 9)).verdict is Verdict.GAP


def test_a_gap_is_found_without_the_high_watermark():
    assert judge(StoredPosition(3, FP), LogView(7, None)).verdict is Verdict.GAP


def test_a_log_emptied_by_retention_past_the_position_is_a_gap():
    # Every record deleted: the log start is its end, and the position lies below both.
    check = judge(StoredPosition(20, FP), LogView(30, 30))
    assert check.verdict is Verdict.GAP


def test_a_compacted_record_leaves_the_position_unverified():
    check = judge(StoredPosition(10, FP), LogView(0, 20, (12, fingerprint(0, b"k", b"v"))))
    assert check.verdict is Verdict.UNVERIFIED


def test_no_answer_from_the_broker_leaves_the_position_unverified():
    assert judge(StoredPosition(10, FP), LogView(None, None)).verdict is Verdict.UNVERIFIED
    assert judge(StoredPosition(10, FP), LogView(0, 20, None)).verdict is Verdict.UNVERIFIED


def test_the_reset_command_names_group_topic_and_partition():
    assert reset_command("g", "t", 3) == (
        "ingest positions reset --group g --topic t --partition 3 --to-earliest"
    )
    assert reset_command("g", "t", None, "--to-latest") == (
        "ingest positions reset --group g --topic t --to-latest"
    )
