"""The rolling-restart bench's own bookkeeping: what counts as a revocation, and its report."""

from __future__ import annotations

from pathlib import Path

import orjson

from ingest.tools.bench.rolling import Replica, Rolling, describe


def _replica_with_log(tmp_path: Path, *events: dict[str, object]) -> Replica:
    log = tmp_path / "replica-0.log"
    log.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return Replica("ingest-0", {}, log)


def test_a_revocation_counts_only_when_it_took_partitions(tmp_path: Path) -> None:
    replica = _replica_with_log(
        tmp_path,
        {"event": "partitions revoked", "partitions": []},
        {"event": "partitions revoked", "partitions": ["t/0", "t/3"]},
        {"event": "partitions assigned", "partitions": ["t/0", "t/3"]},
    )

    assert replica.revocations() == 1


def test_lines_that_are_not_json_are_skipped(tmp_path: Path) -> None:
    replica = _replica_with_log(tmp_path, {"event": "partitions revoked", "partitions": ["t/1"]})
    with open(replica.log_path, "ab") as f:
        f.write(b'Traceback "partitions revoked" (not a log record)\n')

    assert replica.revocations() == 1


def test_the_report_says_when_the_run_was_not_exact() -> None:
    r = Rolling("static", 3, 6, 3000.0, "default", "default", exact=False)

    assert "exact (every event stored once): NO" in describe(r)
