"""Poison or systemic, on real servers with a real worker process.

A model step that fails for valid events is systemic: the worker stops consuming with
its offsets uncommitted, dead-letters nothing, shows the failure in its metrics and in
`istream status`, and exits with status 70 after ISTREAM_SYSTEMIC_MAX_ATTEMPTS. Once the
configuration is fixed, a restarted worker applies every event from those offsets, and
a value Postgres rejects (an id longer than its column, which a raised id limit lets
through the validator) is still isolated and dead-lettered.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream.broker import free_port
from tests.helpers import run_cli, wait_for
from tests.integration.stream_harness import Stack, WorkerProcess, workers
from tests.integration.workload import build_workload, dead_letter_ids

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXIT_SYSTEMIC = 70


def test_a_broken_model_step_stops_the_worker_and_a_poison_record_is_still_dead_lettered(
    server_tmp: Path,
) -> None:
    # The broken model is a decayed mean underneath: the same vector width in Postgres.
    with Stack(server_tmp, model="decayed_mean") as stack:
        s = stack.settings
        work = build_workload(s, n_users=30, n_events=600)
        stack.produce(work.catalog + work.events)
        port = free_port()
        broken = WorkerProcess(
            stack,
            "broken",
            ISTREAM_MODEL="shape_broken",
            ISTREAM_PLUGINS="tests.integration.broken_model",
            ISTREAM_SYSTEMIC_MAX_ATTEMPTS="4",
            ISTREAM_METRICS_PORT=str(port),
            ISTREAM_BATCH_SIZE="100",
        ).start()
        env = {
            "ISTREAM_KAFKA_BOOTSTRAP": stack.bootstrap,
            "ISTREAM_DATABASE_URL": stack.db_url,
            "ISTREAM_STATUS_WORKERS": f"http://127.0.0.1:{port}/metrics",
        }
        with workers(broken):
            seen: list[str] = []

            def status_says_failing() -> bool:
                out = run_cli("status", env=env, timeout=60)
                seen.append(out.stdout + out.stderr)
                return out.returncode == 0 and "SYSTEMIC FAILURE" in out.stdout

            wait_for(status_says_failing, 120, "istream status to report the systemic failure")
            assert "model step (learn): RuntimeError: mat1 and mat2" in seen[-1], seen[-1]
            assert broken.proc is not None
            rc = broken.proc.wait(120)
        log = broken.log_text()
        assert rc == EXIT_SYSTEMIC, broken.tail()
        assert log.count("systemic failure (attempt") == 4, broken.tail()
        assert "poison record" not in log
        # Nothing of the events was committed: no applied event, no event topic's offset moved.
        assert stack.sql("SELECT count(*) FROM applied_events")[0][0] == 0
        moved = stack.sql(
            "SELECT topic, partition, next_offset FROM consumed_offsets WHERE topic = ANY(:t)",
            t=list(s.event_topics),
        )
        assert moved == [], moved
        assert stack.topic_values(s.topic_dead_letter) == []

        # The configuration is fixed; meanwhile invalid records and a poison record arrived.
        poison_id = "poison-long-" + "x" * 150  # Postgres' event_id column holds 128
        poison = {"event_id": poison_id, "user_id": "user-1", "item_id": "x", "rating": 4, "ts": 1}
        stack.produce([*work.invalid, (s.topic_ratings, b"user-1", json.dumps(poison).encode())])
        fixed = WorkerProcess(stack, "fixed", ISTREAM_MAX_ID_LEN="300", ISTREAM_BATCH_SIZE="100").start()
        with workers(fixed):
            stack.wait_applied(sum(work.expected.values()), timeout=180, workers=[fixed])
            wait_for(
                lambda: poison_id in dead_letter_ids(stack.topic_values(s.topic_dead_letter)),
                60,
                "the poison record on the dead-letter topic",
                proc=fixed.proc,
                log=fixed.log_path,
            )
            assert fixed.terminate() == 0, fixed.tail()
        stack.check_invariants(work.expected)
        letters = stack.topic_values(s.topic_dead_letter)
        dead = dead_letter_ids(letters)
        assert not [e for e in dead if e.startswith("syn-")]
        assert {"bad-rating", "bad-missing-user", "poison-1", poison_id} <= set(dead)
        reason = next(v["reason"] for v, e in zip(letters, dead, strict=True) if e == poison_id)
        assert "value too long" in reason, reason
        nul = next(v["reason"] for v, e in zip(letters, dead, strict=True) if e == "poison-1")
        assert "NUL character" in nul, nul  # caught by the validator now, not by bisection
        assert "systemic" not in fixed.log_text()
