"""A real Prometheus server scrapes a real worker process: what the dashboards and alerts
rely on arrives in Prometheus, not only in /metrics.

Prometheus (the server, e.g. Debian's package `prometheus`; ``PROMETHEUS_BIN`` overrides
the path) scrapes the worker every second with a temporary configuration that also loads
``deploy/prometheus/alerts.yml``; the test keeps traffic flowing for about 10 s and asks
Prometheus' HTTP API for the write rate and the lag series.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from ingest.tools.devbroker import free_port
from tests.support import (
    Published,
    WorkerProcess,
    call_events,
    drained,
    eventually,
    http_get_blocking,
    publish,
    record,
    worker_env,
)

PROMETHEUS = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus") or "/usr/bin/prometheus"
ALERT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
PARTITIONS = 4  # the `topics` fixture's source topic
TRAFFIC_S = 10.0
CALLS_PER_SECOND = 60  # five events per call: about 300 events/s

pytestmark = pytest.mark.skipif(
    not (os.path.isfile(PROMETHEUS) and os.access(PROMETHEUS, os.X_OK)),
    reason=f"no Prometheus server binary at {PROMETHEUS} "
    "(apt-get install prometheus, or set PROMETHEUS_BIN)",
)


def _api(port: int, path: str, **params: str) -> Any:
    """GET a Prometheus HTTP API path; the `data` of a successful answer."""
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def _query(port: int, promql: str) -> list[dict[str, Any]]:
    """An instant query's result vector."""
    data = _api(port, "/api/v1/query", query=promql)
    assert data["resultType"] == "vector", data
    return list(data["result"])


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _start_prometheus(tmp_path: Path, metrics_port: int, port: int) -> subprocess.Popen[bytes]:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "rule_files:\n"
        f"  - {json.dumps(str(ALERT_RULES))}\n"
        "scrape_configs:\n"
        "  - job_name: ingest\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    with open(tmp_path / "prometheus.log", "ab") as log:
        return subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _traffic(bootstrap: str, topic: str) -> Published:
    """About CALLS_PER_SECOND whole calls a second for TRAFFIC_S seconds."""
    pub = Published()
    end = time.monotonic() + TRAFFIC_S
    while (started := time.monotonic()) < end:
        records = [record(e) for _ in range(CALLS_PER_SECOND) for e in call_events(uuid.uuid4())]
        pub.extend(await publish(bootstrap, topic, records))
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    return pub


@pytest.mark.timeout(60)
async def test_prometheus_scrapes_write_rate_and_lag_per_partition(
    database_url, db, topics, tmp_path: Path
):
    budget = time.monotonic() + 40  # the whole test, fixtures aside

    def left() -> float:
        return max(1.0, budget - time.monotonic())

    metrics_port, prom_port = free_port(), free_port()
    env = worker_env(database_url, topics, INGEST_HTTP_PORT=str(metrics_port))
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    prometheus = _start_prometheus(tmp_path, metrics_port, prom_port)
    traffic: asyncio.Task[Published] | None = None
    try:

        async def prometheus_ready() -> bool:
            assert prometheus.poll() is None, "prometheus exited"
            return await asyncio.to_thread(_ready, prom_port)

        async def worker_ready() -> bool:
            assert worker.alive(), "worker exited"
            with contextlib.suppress(OSError):
                status, _ = await asyncio.to_thread(http_get_blocking, metrics_port, "/readyz")
                return status == 200
            return False

        await eventually(prometheus_ready, min(15, left()), "prometheus /-/ready")
        await eventually(worker_ready, min(20, left()), "worker /readyz 200")

        traffic = asyncio.create_task(_traffic(topics.bootstrap, topics.source))

        async def writing() -> bool:
            result = await asyncio.to_thread(
                _query, prom_port, "rate(ingest_events_written_total[15s]) > 0"
            )
            return len(result) == 1 and float(result[0]["value"][1]) > 0

        async def lag_per_partition() -> bool:
            result = await asyncio.to_thread(_query, prom_port, "ingest_consumer_lag_records")
            return sorted(int(s["metric"]["partition"]) for s in result) == list(range(PARTITIONS))

        await eventually(writing, min(TRAFFIC_S + 5, left()), "rate(written) > 0 in Prometheus")
        await eventually(lag_per_partition, left(), f"{PARTITIONS} lag series in Prometheus")

        # One series per partition, all of this worker's source topic and scrape job.
        lag = await asyncio.to_thread(_query, prom_port, "ingest_consumer_lag_records")
        assert len(lag) == PARTITIONS
        assert {s["metric"]["topic"] for s in lag} == {topics.source}
        assert {s["metric"]["job"] for s in lag} == {"ingest"}

        up = await asyncio.to_thread(_query, prom_port, 'up{job="ingest"}')
        assert [s["value"][1] for s in up] == ["1"]

        # The shipped alert rules load into a real Prometheus and evaluate without error.
        async def rules_evaluated() -> bool:
            data = await asyncio.to_thread(_api, prom_port, "/api/v1/rules")
            rules = [r for g in data["groups"] if g["name"] == "ingest" for r in g["rules"]]
            assert all(r.get("health") != "err" for r in rules), rules
            return bool(rules) and all(r.get("health") == "ok" for r in rules)

        await eventually(rules_evaluated, left(), "the ingest alert rules to evaluate")

        pub = await asyncio.wait_for(traffic, left())
        assert len(pub.records) >= 5 * CALLS_PER_SECOND * 5
        await drained(db, topics, pub, timeout_s=left())
    except BaseException:
        # What the processes said, next to the failure.
        print("---- worker log\n" + worker.log()[-4000:])
        print("---- prometheus log\n" + (tmp_path / "prometheus.log").read_text()[-4000:])
        raise
    finally:
        if traffic is not None and not traffic.done():
            traffic.cancel()
            with contextlib.suppress(BaseException):
                await traffic
        _stop(prometheus)
        worker.stop()
