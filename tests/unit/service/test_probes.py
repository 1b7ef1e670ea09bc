"""What /readyz says, from the worker's health state."""

from __future__ import annotations

from ingest.pipeline.source import Stall
from ingest.service.probes import Health


def _healthy() -> Health:
    h = Health()
    h.database_ok = True
    h.group_joined = True
    h.not_ready_because = None
    return h


def test_a_healthy_worker_is_ready() -> None:
    assert _healthy().ready() == (True, "ready")


def test_a_stalled_partition_makes_the_worker_unready_and_is_named() -> None:
    h = _healthy()
    h.stalled = [Stall("events", 3, 1207, "CorruptRecordException: Invalid CRC").describe()]

    ok, why = h.ready()

    assert not ok
    assert why == (
        "partition stalled, undecodable record batch: "
        "events/3 at offset 1207: CorruptRecordException: Invalid CRC"
    )


def test_an_unreachable_database_says_why_when_known() -> None:
    h = _healthy()
    h.database_ok = False
    h.not_ready_because = "standing fault: SSLCertVerificationError"

    assert h.ready() == (
        False,
        "database unreachable: standing fault: SSLCertVerificationError",
    )


def test_a_standing_kafka_fault_is_reported_before_the_group_check() -> None:
    h = _healthy()
    h.group_joined = False
    h.not_ready_because = "standing fault: SSLCertVerificationError"

    assert h.ready() == (False, "standing fault: SSLCertVerificationError")


def test_a_starting_worker_reports_what_it_waits_for() -> None:
    h = Health()
    assert h.ready() == (False, "database unreachable")
    h.database_ok = True
    assert h.ready() == (False, "consumer has not joined its group")
