"""What `ingest positions show | reset` print (pure)."""

from __future__ import annotations

from ingest.tools.positions import Move, PartitionState, ResetResult, format_plan, format_show


def test_lag_is_the_high_watermark_minus_the_stored_position_and_unknown_without_either():
    assert PartitionState("t", 0, 90, 100, None, "ok").lag == 10
    assert PartitionState("t", 0, 120, 100, None, "mismatch").lag == 0
    assert PartitionState("t", 0, None, 100, None, "no stored position").lag is None
    assert PartitionState("t", 0, 90, None, None, "ok").lag is None


def test_show_prints_one_aligned_line_per_partition_with_dashes_for_unknowns():
    text = format_show(
        "g",
        [
            PartitionState("call-events", 0, 90, 100, 90, "ok"),
            PartitionState("call-events", 11, None, 5, None, "no stored position"),
        ],
    )
    lines = text.splitlines()
    assert lines[0] == "group g"
    assert lines[1].split() == [
        "topic",
        "partition",
        "stored",
        "high_watermark",
        "lag",
        "kafka_committed",
        "check",
    ]
    assert lines[2].split() == ["call-events", "0", "90", "100", "10", "90", "ok"]
    assert lines[3].split() == ["call-events", "11", "-", "5", "-", "-", "no", "stored", "position"]
    assert lines[1].index("check") == lines[2].index("ok") == lines[3].index("no stored")


def test_a_dry_run_plan_says_nothing_changed_and_warns_of_live_members():
    result = ResetResult([Move("t", 2, 40, 0), Move("t", 3, None, 0)], ["m-1@host"])
    text = format_plan("g", result, dry_run=True)
    assert "dry run: nothing changed" in text
    assert "t/2: would move 40 -> 0" in text
    assert "t/3: would move - -> 0" in text
    assert "refused unless --force" in text


def test_an_applied_plan_says_whether_kafka_followed():
    result = ResetResult([Move("t", 2, 40, 0)], [], applied=True, kafka_committed=True)
    assert "kafka committed offsets: moved" in format_plan("g", result, dry_run=False)
    result.kafka_committed, result.kafka_error = False, "CommitFailedError: rebalanced"
    assert "not moved (CommitFailedError: rebalanced)" in format_plan("g", result, dry_run=False)
