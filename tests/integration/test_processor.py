"""BatchProcessor + ResilientRunner on real Postgres: idempotence, rollback of memory, hand-over, poison."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from models.decayed_mean import DecayedMeanModel
from storage.db import make_engine, upgrade
from storage.repository import VectorStore
from stream.processor import BatchProcessor, ShuttingDown, SystemicFailure
from stream.records import RawRecord
from stream.resilience import ResilientRunner
from stream.schema import Limits
from tests.fakes import HashEncoder


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """These tests use the 16-d HashEncoder, so the schema is migrated for 16-d vectors."""
    upgrade(empty_db_url, vector_dim=16)
    return empty_db_url


pytestmark = pytest.mark.integration

TOPICS = {"interest.clicks": "click", "interest.items": "item"}


def make(
    db_url: str,
    sink: list[dict[str, Any]] | None = None,
    limits: Limits | None = None,
    model: DecayedMeanModel | None = None,
) -> BatchProcessor:
    store = VectorStore(make_engine(db_url), group_id="g")
    model = model or DecayedMeanModel(HashEncoder(16))
    proc = BatchProcessor(
        model,
        store,
        TOPICS,
        limits or Limits(),
        "hash",
        dead_letter_sink=sink.extend if sink is not None else None,
    )
    proc.restore()
    return proc


def items(offset: int = 0) -> list[RawRecord]:
    texts = ["space rocket", "pasta recipe", "football goal", "jazz piano"]
    return [
        RawRecord(
            "interest.items",
            0,
            offset + i,
            f"i{i}".encode(),
            json.dumps({"item_id": f"i{i}", "text": t}).encode(),
        )
        for i, t in enumerate(texts)
    ]


def clicks(start: int, n: int, user: str = "u1", partition: int = 0) -> list[RawRecord]:
    return [
        RawRecord(
            "interest.clicks",
            partition,
            k,
            user.encode(),
            json.dumps(
                {"event_id": f"{user}-{k}", "user_id": user, "item_id": f"i{k % 4}", "ts": 1000 * (k + 1)}
            ).encode(),
        )
        for k in range(start, start + n)
    ]


def row(proc: BatchProcessor, user: str) -> Any:
    return proc.store.current(user)


def test_reprocessing_a_batch_changes_nothing(db_url: str) -> None:
    proc = make(db_url)
    proc.process(items())
    first = proc.process(clicks(0, 5))
    again = proc.process(clicks(0, 5))
    assert (first.applied, again.applied, again.duplicates) == (5, 0, 5)
    assert row(proc, "u1").n_events == 5 and row(proc, "u1").version == 1
    assert proc.store.stored_offsets()[("interest.clicks", 0)] == 5


def test_a_failed_commit_leaves_memory_as_postgres_has_it(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = make(db_url)
    clean.process(items())
    clean.process(clicks(0, 4, user="ref"))
    clean.process(clicks(4, 4, user="ref"))

    proc = make(db_url)
    proc.process(clicks(0, 4))
    real = proc.store.commit_batch
    failures = iter([True])

    def flaky(**kw: Any) -> Any:
        if next(failures, False):
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
        return real(**kw)

    monkeypatch.setattr(proc.store, "commit_batch", flaky)
    retries: list[int] = []
    out = ResilientRunner(proc, max_wait_s=0.05, on_retry=lambda: retries.append(1)).run(clicks(4, 4))
    assert retries == [1] and out.applied == 4
    assert row(proc, "u1").n_events == 8 and row(proc, "u1").version == 2
    # The learn of the failed attempt was undone: the vector equals the never-failed one.
    np.testing.assert_allclose(
        np.asarray(row(proc, "u1").vector), np.asarray(row(clean, "ref").vector), atol=1e-6
    )


def test_a_user_moving_between_workers_continues_from_the_checkpoint(db_url: str) -> None:
    ref = make(db_url)
    ref.process(items())
    for start in (0, 3, 6):
        ref.process(clicks(start, 3, user="ref"))
    a, b = make(db_url), make(db_url)
    a.process(clicks(0, 3))
    b.process(clicks(3, 3))  # the partition moved to b: b loads a's checkpoint first
    a.process(clicks(6, 3))  # and back: a's memory is stale and must be reloaded
    cur = row(a, "u1")
    assert (cur.n_events, cur.version) == (9, 3)
    np.testing.assert_allclose(np.asarray(cur.vector), np.asarray(row(ref, "ref").vector), atol=1e-6)


def test_a_restarted_processor_resumes_user_state(db_url: str) -> None:
    a = make(db_url)
    a.process(items())
    a.process(clicks(0, 3))
    b = make(db_url)  # a "restart": nothing in memory
    b.process(clicks(3, 3))
    assert b.model.get_user_state("u1")["n_events"] == 6  # type: ignore[index]


def test_a_poison_record_is_isolated_and_dead_lettered(db_url: str) -> None:
    """A value Postgres rejects (an id longer than its column: the id limit was raised by
    configuration, a rule the validator then misses) is record-level: bisected, dead-lettered."""
    sink: list[dict[str, Any]] = []
    proc = make(db_url, sink, limits=Limits(max_id_len=300))
    proc.process(items())
    batch = clicks(0, 6)
    poison = RawRecord(
        "interest.clicks",
        0,
        6,
        b"x",
        json.dumps({"event_id": "p" * 200, "user_id": "u2", "item_id": "i1", "ts": 5}).encode(),
    )
    bad_json = RawRecord("interest.clicks", 0, 7, b"x", b"{not json")
    out = ResilientRunner(proc).run([*batch[:3], poison, *batch[3:], bad_json])
    assert out.applied == 6
    # Dead letters are sent at least once: the failed first attempt had sent the invalid JSON's.
    reasons = {e["offset"]: e["reason"].split(":")[0] for e in sink}
    assert reasons == {6: "processing failed", 7: "invalid JSON"}
    assert "StringDataRightTruncation" in next(e["reason"] for e in sink if e["offset"] == 6)
    assert row(proc, "u1").n_events == 6
    assert row(proc, "u2") is None
    assert proc.store.stored_offsets()[("interest.clicks", 0)] == 8


class ShapeBroken(DecayedMeanModel):
    """A model step that fails for every batch, as a shape error after a config change would."""

    def learn(self, events: Any) -> Any:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x384 and 256x64)")


def test_a_model_step_error_is_systemic_nothing_dead_lettered_no_offset_moves(db_url: str) -> None:
    sink: list[dict[str, Any]] = []
    proc = make(db_url, sink, model=ShapeBroken(HashEncoder(16)))
    proc.process(items())
    before = proc.store.stored_offsets()
    with pytest.raises(SystemicFailure, match=r"model step \(learn\): RuntimeError: mat1 and mat2"):
        ResilientRunner(proc).run([*clicks(0, 6), RawRecord("interest.clicks", 0, 6, b"x", b"{not json")])
    assert sink == []  # not even the invalid record: its batch did not commit
    assert proc.store.stored_offsets() == before
    assert row(proc, "u1") is None


class TrainableFake(DecayedMeanModel):
    """Decayed mean plus one shared trainable scalar; a trainer publishes a snapshot per batch."""

    name = "trainable_fake"

    def __init__(self, encoder: HashEncoder) -> None:
        super().__init__(encoder)
        self.step = 0
        self.train_shared = True

    @property
    def model_version(self) -> str:
        return f"trainable_fake@{self.step}"

    def config(self) -> dict[str, Any]:
        return {"model": self.name}

    def learn(self, events: Any) -> Any:
        result = super().learn(events)
        if not self.train_shared:
            result.model_version = self.model_version
            return result
        self.step += 1
        snap = self.snapshot()
        from dataclasses import replace

        result.snapshot = replace(snap, weights=str(self.step).encode())
        result.model_version = self.model_version
        return result

    def weights(self) -> bytes:
        return str(self.step).encode()

    def load_weights(self, weights: bytes, base: Callable[[str], bytes | None] | None = None) -> None:
        self.step = int(weights)


def trainable_processor(db_url: str) -> BatchProcessor:
    """A worker's processor with a trainable model, restored from the database."""
    p = BatchProcessor(
        TrainableFake(HashEncoder(16)), VectorStore(make_engine(db_url), "g"), TOPICS, Limits(), "h"
    )
    p.restore()
    return p


def test_one_trainer_others_follow_the_registry(db_url: str) -> None:
    def proc() -> BatchProcessor:
        return trainable_processor(db_url)

    trainer, follower = proc(), proc()
    trainer.set_trainer(True)
    follower.set_trainer(False)
    trainer.process(items())
    trainer.process(clicks(0, 3, user="a", partition=0))
    trainer.process(clicks(3, 3, user="a", partition=0))
    out = follower.process(clicks(0, 3, user="b", partition=1))
    # The follower adopted the trainer's newest weights and published nothing of its own.
    assert out.model_version == "trainable_fake@2"
    with trainer.store.engine.connect() as conn:
        published = {r[0] for r in conn.execute(text("SELECT model_version FROM model_versions"))}
    assert published == {"trainable_fake@0", "trainable_fake@1", "trainable_fake@2"}
    # A restarted trainer continues from the newest weights, not from scratch.
    again = proc()
    assert again.model.model_version == "trainable_fake@2"
    for p in (trainer, follower, again):
        p.close()


def test_one_trainer_at_a_time_and_the_next_continues_the_line(db_url: str) -> None:
    """During a rebalance two workers may both own partition 0 for a moment: the trainer lock
    lets one train, and whoever takes the role next starts from the newest published weights."""

    def proc() -> BatchProcessor:
        return trainable_processor(db_url)

    old, new = proc(), proc()
    old.set_trainer(True)
    new.set_trainer(True)
    assert old.trainer and not new.trainer  # the old owner still holds the lock
    old.process(items())
    old.process(clicks(0, 3, user="a", partition=0))
    assert new.process(clicks(0, 3, user="b", partition=1)).model_version == "trainable_fake@1"
    old.set_trainer(False)  # the old owner lets go (its partitions were revoked)
    new.set_trainer(True)
    assert new.trainer and new.model.model_version == "trainable_fake@1"
    assert new.process(clicks(3, 3, user="b", partition=1)).model_version == "trainable_fake@2"
    with new.store.engine.connect() as conn:
        parents = conn.execute(
            text("SELECT parent, count(*) FROM model_versions WHERE parent IS NOT NULL GROUP BY parent")
        ).all()
    assert all(n == 1 for _, n in parents)  # one line of versions, no fork
    old.close()
    new.close()


def test_a_partition_lock_wait_gives_up_when_the_worker_stops(db_url: str) -> None:
    """Issue 12: a batch waiting for a partition lock held by a staged, uncommitted batch used
    to wait in pg_advisory_lock for ever; now it gives up (ShuttingDown) once told to stop."""
    holder, waiter = make(db_url), make(db_url)
    lock = holder.lock_partitions([1])
    stop = threading.Event()
    waiter.should_stop = stop.is_set
    threading.Timer(1.0, stop.set).start()
    try:
        with pytest.raises(ShuttingDown, match="partition 1's lock"):
            waiter.process(clicks(0, 3, user="u1", partition=1))
        assert stop.is_set()  # it waited until the stop, not less
        assert row(waiter, "u1") is None
    finally:
        lock.release()
    assert waiter.process(clicks(0, 3, user="u1", partition=1)).applied == 3  # the lock is free again


def registered(proc: BatchProcessor) -> set[str]:
    with proc.store.engine.connect() as conn:
        return {r[0] for r in conn.execute(text("SELECT model_version FROM model_versions"))}


def test_a_learned_version_is_stored_by_the_commit_before_the_rows_that_name_it(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model thread learns on while the commit thread writes the version it published; a
    commit that fails leaves the version for the next commit, which a row naming it waits for."""
    proc = trainable_processor(db_url)
    proc.set_trainer(True)
    proc.process(items())
    staged = proc.stage(clicks(0, 3, user="a", partition=0))
    assert staged.model_version == "trainable_fake@1"
    assert "trainable_fake@1" not in registered(proc)  # learned, not yet written: no row names it
    real = proc.store.commit_batch

    def down(**_: Any) -> dict[str, int]:
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(proc.store, "commit_batch", down)
    with pytest.raises(OperationalError):
        proc.commit(staged)
    proc.abandon(staged)
    monkeypatch.setattr(proc.store, "commit_batch", real)
    # The next batch (another partition) names the same version without having published it.
    proc.model.train_shared = False  # learns without a new version
    again = proc.stage(clicks(0, 3, user="b", partition=1))
    assert again.model_version == "trainable_fake@1"
    proc.finish(again, proc.commit(again))
    assert "trainable_fake@1" in registered(proc)
    assert row(proc, "b") is not None and row(proc, "b").model_version == "trainable_fake@1"
    proc.close()


def test_giving_up_training_writes_the_versions_learned_first(db_url: str) -> None:
    """The next trainer starts from the newest stored version: a version still waiting for the
    commit thread is written before the trainer lock is let go, so the line does not fork."""
    old, new = trainable_processor(db_url), trainable_processor(db_url)
    old.set_trainer(True)
    new.set_trainer(False)  # a follower while the other trains
    old.process(items())
    staged = old.stage(clicks(0, 3, user="a", partition=0))  # learned; its commit not run yet
    assert staged.model_version not in registered(old)
    old.set_trainer(False)
    assert staged.model_version in registered(old)
    new.set_trainer(True)
    assert new.trainer and new.model.model_version == staged.model_version
    old.finish(staged, old.commit(staged))
    for p in (old, new):
        p.close()


def test_an_unchanged_catalog_record_rewrites_nothing_and_a_changed_one_is_applied(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = make(db_url)
    proc.process(items())
    written: list[str] = []
    real = proc.store.write_item_vectors

    def spy(version: str, ids: Any, *args: Any, **kwargs: Any) -> None:
        written.extend(ids)
        real(version, ids, *args, **kwargs)

    monkeypatch.setattr(proc.store, "write_item_vectors", spy)
    # The items topic re-read after the catalog bootstrap; our own rows are inside
    # refresh_catalog's 30 s slack: neither writes anything again.
    proc.process(items(offset=4))
    assert proc.refresh_catalog() == 0
    assert written == []
    before = proc.model.item_matrix()[proc.model.item_ids().index("i1")].copy()
    changed = RawRecord(
        "interest.items", 0, 8, b"i1", json.dumps({"item_id": "i1", "text": "jazz piano trio"}).encode()
    )
    proc.process([changed])
    assert written == ["i1"]
    assert not np.allclose(proc.model.item_matrix()[proc.model.item_ids().index("i1")], before)
    with proc.store.engine.connect() as conn:
        assert (
            conn.execute(text("SELECT text FROM items WHERE item_id = 'i1'")).scalar_one()
            == "jazz piano trio"
        )
    proc.close()
