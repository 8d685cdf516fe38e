"""Two workers in one group share the partitions; one leaves midway (real servers).

Same invariants as the fault test: every user's n_events equals the valid
events produced for them, versions gapless, nothing valid dead-lettered; and
both workers wrote vectors in one model space. For the untrained model that is
one model_version; for `adapter` one trainer (the owner of partition 0) publishes
a single line of versions that the other follows, and every version a vector
names has its weights and all its item vectors.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.integration.stream_harness import FAULT_MODELS, Stack, WorkerProcess, workers
from tests.integration.workload import build_workload, dead_letter_ids

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _partitions_in(log: str) -> set[int]:
    """Partitions a worker ever committed a batch for."""
    found = re.findall(r"batch p([\d,]+): \d+ records, [1-9]", log)
    return {int(p) for parts in found for p in parts.split(",")}


def _batches(log: str) -> int:
    return len(re.findall(r"batch p[\d,]+: \d+ records, [1-9]", log))


@pytest.mark.parametrize("model", FAULT_MODELS)
def test_two_workers_share_partitions_and_one_leaves(server_tmp: Path, model: str) -> None:
    with Stack(server_tmp, model=model) as stack:
        work = build_workload(stack.settings, n_users=300, n_events=8000)
        chunks = work.chunks(4)
        stack.produce(work.catalog + chunks[0])
        a = WorkerProcess(stack, "worker-a", ISTREAM_BATCH_SIZE="100").start()
        b = WorkerProcess(stack, "worker-b", ISTREAM_BATCH_SIZE="100").start()
        with workers(a, b):
            # Both in the group: wait until each has committed batches of its own.
            deadline = time.monotonic() + 120
            while min(_batches(a.log_text()), _batches(b.log_text())) < 3:
                a.assert_alive()
                b.assert_alive()
                assert time.monotonic() < deadline, a.tail() + b.tail()
                stack.produce(chunks[1][:200])
                chunks[1] = chunks[1][200:]
                time.sleep(1.0)
            stack.produce(chunks[1] + chunks[2])
            # B leaves midway (SIGTERM: it flushes, leaves the group); A takes its partitions
            # over from Postgres' offsets. (test_faults covers SIGKILL.)
            stack.wait_progress(b)  # while the workers are applying what was just produced
            assert b.terminate() == 0, b.tail()
            stack.produce(chunks[3])
            stack.wait_applied(sum(work.expected.values()), timeout=180, workers=[a])
            assert a.terminate() == 0, a.tail()
        assert _partitions_in(a.log_text()) == set(range(stack.settings.partitions))
        assert "partitions assigned: [0, 1, 2, 3]" in a.log_text().split("shutdown: flushed")[0]
        assert _partitions_in(b.log_text())  # B did its share while it was there
        stack.check_invariants(work.expected)
        dead = dead_letter_ids(stack.topic_values(stack.settings.topic_dead_letter))
        assert not [e for e in dead if e.startswith("syn-")]
        named = [v for (v,) in stack.sql("SELECT DISTINCT model_version FROM user_interest_vectors")]
        for mv in named:
            # A version can rank every item stored before its vectors were written (an item
            # stored later appears for its users once they act again). 2 s of slack: row and
            # item times are their transactions' start times, not commit times.
            missing = stack.sql(
                """SELECT i.item_id FROM items i
                   LEFT JOIN item_vectors v ON v.item_id = i.item_id AND v.model_version = :mv
                   WHERE v.item_id IS NULL AND i.updated_at < (
                       SELECT max(created_at) - interval '2 seconds'
                       FROM user_interest_vectors WHERE model_version = :mv)""",
                mv=mv,
            )
            assert not missing, (mv, len(missing), stack.sql("SELECT count(*) FROM items"))
        if model == "decayed_mean":
            assert len(named) == 1  # nothing trained: one space
            return
        # One trainer: the versions form one line (a second trainer would fork it), each with
        # its weights, and both workers named versions of that line.
        forks = stack.sql(
            "SELECT parent, count(*) FROM model_versions WHERE parent IS NOT NULL "
            "GROUP BY parent HAVING count(*) > 1"
        )
        assert not forks, forks
        unweighted = stack.sql("SELECT count(*) FROM model_versions WHERE weights IS NULL")
        assert unweighted[0][0] == 0
        assert len(named) > 1  # training went on while both served
        assert "follows the registry" in a.log_text() + b.log_text()
