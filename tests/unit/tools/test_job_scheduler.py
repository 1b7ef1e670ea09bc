"""What ``migrate status`` says about TimescaleDB's job scheduler (pure)."""

from __future__ import annotations

from ingest.tools.migrate import JobScheduler


def test_a_running_scheduler_is_reported_with_the_worker_pool() -> None:
    line = JobScheduler(running=True, workers_in_use=4, max_workers=8).describe()
    assert line == (
        "policy jobs: TimescaleDB's scheduler runs for this database "
        "(background workers 4 of 8 in use)"
    )


def test_a_missing_scheduler_says_the_policies_do_not_run_and_what_to_raise() -> None:
    line = JobScheduler(running=False, workers_in_use=8, max_workers=8).describe()
    assert line.startswith("policy jobs: NOT RUNNING")
    assert "(background workers 8 of 8 in use)" in line
    assert "compression, retention and refreshes wait" in line
    assert "max_worker_processes" in line
