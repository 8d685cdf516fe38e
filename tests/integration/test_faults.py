"""Exactly-once effects through SIGKILLs, a Postgres restart and a broker cut (real servers).

Run for the learned model (`LEARNED_MODEL`), whose weights, user states and line of versions
must survive the faults as its events do; with ISTREAM_TEST_THOROUGH=1 for the untrained one too.

20,000 events for 500 users (plus duplicates, invalid and poison records) go
through a worker subprocess that is killed with SIGKILL five times at random
moments, loses Postgres once and its broker connection for ten seconds once.
At the end every user's n_events equals the valid events produced for them,
versions are gapless, and only the invalid records are on the dead-letter topic;
every model version a user vector names is registered with its item vectors and (learned
model) weights that match their checksum.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest

from stream.broker import free_port
from tests.helpers import wait_for
from tests.integration.stream_harness import FAULT_MODELS, LEARNED_MODEL, Stack, WorkerProcess, workers
from tests.integration.workload import build_workload, dead_letter_ids

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_USERS = int(os.environ.get("FAULT_USERS", "500"))
N_EVENTS = int(os.environ.get("FAULT_EVENTS", "20000"))
KILLS = int(os.environ.get("FAULT_KILLS", "5"))


def wait_progress(stack: Stack, worker: WorkerProcess, timeout: float = 120.0) -> None:
    before = stack.applied_total()
    deadline = time.monotonic() + timeout
    while stack.applied_total() <= before:
        worker.assert_alive()
        assert time.monotonic() < deadline, f"no progress in {timeout:.0f}s\n{worker.tail()}"
        time.sleep(0.2)


@pytest.mark.parametrize("model", FAULT_MODELS)
def test_faults_lose_and_duplicate_nothing(server_tmp: Path, model: str) -> None:
    rng = random.Random(int(os.environ.get("FAULT_SEED", "5")))
    with Stack(server_tmp, model=model) as stack:
        work = build_workload(stack.settings, N_USERS, N_EVENTS)
        chunks = work.chunks(KILLS + 3)
        stack.produce(work.catalog + chunks[0])
        worker = WorkerProcess(stack, "worker", ISTREAM_BATCH_SIZE="250").start()
        with workers(worker):
            # SIGKILL at random moments: during start-up, rebalance, mid-batch or commit.
            for i in range(KILLS):
                # Half the kills land anywhere (start-up, group join, seek); the others
                # once the worker is applying events (mid-batch, mid-commit).
                if i % 2:
                    wait_progress(stack, worker)
                    time.sleep(rng.uniform(0.0, 2.0))
                else:
                    time.sleep(rng.uniform(2.0, 12.0))
                worker.assert_alive()
                worker.kill()
                stack.produce(chunks[1 + i])
                worker.start()

            # Postgres goes away under a worker that is applying events, with more arriving.
            # It stays away until the worker has met it (a batch failed and is being retried): a
            # fixed outage could end before a worker slowed by a loaded machine reached Postgres.
            wait_progress(stack, worker)
            retries_before = worker.current_log().count("retrying")
            stack.stop_postgres()
            stack.produce(chunks[KILLS + 1])
            wait_for(
                lambda: worker.current_log().count("retrying") > retries_before,
                120,
                "a batch retried against the stopped Postgres",
                proc=worker.proc,
                log=worker.log_path,
            )
            time.sleep(2.0)  # a few more retries against the outage, not a wait on any condition
            stack.start_postgres()

            # The broker connection is cut for ten seconds, again while it is applying events.
            wait_progress(stack, worker)
            time.sleep(rng.uniform(0.0, 1.0))
            stack.proxy.cut()
            time.sleep(10.0)
            stack.proxy.restore()
            stack.produce(chunks[KILLS + 2])

            total = sum(work.expected.values())
            took = stack.wait_applied(total, timeout=240, workers=[worker])
            print(f"all {total} events applied {took:.0f}s after the last fault")
            # Graceful stop; give the last commits a moment to settle, then check.
            assert worker.terminate() == 0, worker.tail()
        stack.check_invariants(work.expected)
        named = stack.check_named_versions()
        if model == LEARNED_MODEL:
            assert len(named) > 1, named  # it trained and published through the faults
        dead = dead_letter_ids(stack.topic_values(stack.settings.topic_dead_letter))
        valid_ids = {e for e in dead if e.startswith("syn-")}
        assert not valid_ids, f"valid events on the dead-letter topic: {sorted(valid_ids)[:10]}"
        # Every invalid record is there (at least once: a kill can re-send a dead letter).
        assert {"bad-rating", "bad-missing-user", "bad-ts", "bad-type", "poison-1"} <= set(dead)
        assert len(dead) >= len(work.invalid)
        log = worker.log_text()
        assert "seek " in log  # restarts resumed from Postgres' offsets
        last_start = log.rsplit("===== start", 1)[1]
        running = last_start.split("worker ready", 1)[1]
        assert "retrying" in running  # the outage hit a running worker, which waited it out


def test_sigterm_flushes_the_open_batch(server_tmp: Path) -> None:
    """Batches that would close only in 10 minutes are committed when the worker is asked to stop."""
    with Stack(server_tmp) as stack:
        work = build_workload(stack.settings, n_users=20, n_events=300)
        stack.produce(work.catalog + work.events)
        worker = WorkerProcess(
            stack,
            "worker",
            ISTREAM_BATCH_SIZE="5000",
            ISTREAM_BATCH_SECONDS="600",
            ISTREAM_METRICS_PORT=str(free_port()),
            # What is checked here is that everything held is flushed, not how fast: room to
            # encode and learn it all on a loaded machine (test_shutdown checks the bound).
            ISTREAM_SHUTDOWN_GRACE_S="60",
        ).start()
        with workers(worker):
            worker.wait_log("worker ready")
            held = len(work.catalog) + len(work.events)
            wait_for(
                lambda: worker.metric("istream_pending_records") == held,
                90,
                f"all {held} records read into the open batches",
                proc=worker.proc,
                log=worker.log_path,
            )
            assert stack.applied_total() == 0  # nothing closed on size or age yet
            assert worker.terminate(timeout=75) == 0, worker.tail()
        assert "shutdown: flushed" in worker.log_text()
        stack.check_invariants(work.expected)


def test_a_slow_batch_keeps_the_worker_in_its_group(server_tmp: Path) -> None:
    """A commit that waits 15 s on a table lock, longer than the 6 s session timeout.

    Training and commits run off the event loop, so heartbeats go on: no rebalance, the
    intake pauses meanwhile, and afterwards every event is applied exactly once.
    """
    with Stack(server_tmp) as stack:
        work = build_workload(stack.settings, n_users=50, n_events=1600)
        first, rest = work.chunks(2)
        stack.produce(work.catalog + first)
        worker = WorkerProcess(stack, "worker", ISTREAM_BATCH_SIZE="100").start()
        with workers(worker):
            wait_progress(stack, worker, timeout=90)
            with stack.engine.connect() as conn:
                conn.exec_driver_sql("LOCK TABLE consumed_offsets IN ACCESS EXCLUSIVE MODE")
                stack.produce(rest)  # arrives while the worker's commit waits on the lock
                # The 15 s are counted from when the commit is waiting, not from the LOCK: a
                # loaded machine may take seconds to bring the worker to it.
                wait_for(
                    lambda: _waiting_on_offsets(stack) > 0,
                    120,
                    "a commit waiting on the locked consumed_offsets",
                    proc=worker.proc,
                    log=worker.log_path,
                )
                time.sleep(15.0)  # the fault's length (past the 6 s session timeout), not a wait
                worker.assert_alive()
                conn.rollback()  # releases the lock
            stack.wait_applied(sum(work.expected.values()), timeout=120, workers=[worker])
            assert worker.terminate() == 0, worker.tail()
        log = worker.log_text()
        slowest = max(float(s) for s in re.findall(r"batch p[\d,]+: .*, ([\d.]+)s$", log, re.MULTILINE))
        assert slowest > 12.0, worker.tail()  # the slow batch really was slow
        assert log.count("partitions assigned") == 1, worker.tail()  # and caused no rebalance
        stack.check_invariants(work.expected)


def _waiting_on_offsets(stack: Stack) -> int:
    return int(
        stack.sql(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'consumed_offsets'::regclass"
        )[0][0]
    )
