"""Metrics, JSON logs and the CLI's answers to misuse (replay, status)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request

from prometheus_client import CollectorRegistry

from stream.broker import free_port
from stream.logs import JsonFormatter
from stream.metrics import WorkerMetrics, serve
from stream.records import BatchOutcome


def test_metrics_are_served_with_batch_figures() -> None:
    registry = CollectorRegistry()
    m = WorkerMetrics(registry)
    outcome = BatchOutcome(applied=3, duplicates=1, loss=0.5, model_version="m@1", committed_at=100.0)
    outcome.event_ts = [99.0, 98.5, 90.0]
    m.observe(outcome, n_records=4)
    m.lag.labels("interest.clicks", "0").set(7)
    port = free_port()
    serve(port, registry)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "istream_events_applied_total 3.0" in body
    assert "istream_events_duplicate_total 1.0" in body
    assert 'istream_consumer_lag{partition="0",topic="interest.clicks"} 7.0' in body
    assert 'istream_model_version_info{version="m@1"} 1.0' in body
    assert "istream_freshness_seconds_count 3.0" in body
    assert "istream_training_loss 0.5" in body


def test_json_logs_carry_extra_fields() -> None:
    record = logging.makeLogRecord(
        {"name": "istream.worker", "msg": "batch p%d", "args": (2,), "levelno": 20}
    )
    record.levelname = "INFO"
    record.applied = 5
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "batch p2" and out["applied"] == 5 and out["level"] == "info"


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ISTREAM_")}
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
    )


def test_cli_misuse_is_one_line_and_nonzero(tmp_path: object) -> None:
    cases = [
        (("replay",), "give one of LOG, --movielens DIR or --lastfm DIR"),
        (("replay", "/no/such.jsonl"), "ISTREAM_KAFKA_BOOTSTRAP is not set"),
        (("replay", "x.jsonl", "--speed", "-1"), "--speed"),
        (("status",), "set ISTREAM_KAFKA_BOOTSTRAP and ISTREAM_DATABASE_URL"),
        (("worker",), "unknown model 'nope' (ISTREAM_MODEL)"),
    ]
    for args, expected in cases:
        out = run_cli(*args, ISTREAM_MODEL="nope")
        assert out.returncode != 0, args
        assert expected in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_taken_metrics_port_is_one_line() -> None:
    import socket

    import pytest

    from stream.metrics import MetricsPortError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(MetricsPortError, match="ISTREAM_METRICS_PORT"):
            serve(port, CollectorRegistry())


def test_replay_of_a_missing_log_says_so() -> None:
    out = run_cli("replay", "/no/such.jsonl", ISTREAM_KAFKA_BOOTSTRAP="127.0.0.1:1")
    assert out.returncode == 1 and "no such event log" in out.stderr and "Traceback" not in out.stderr
