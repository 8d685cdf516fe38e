"""Retention keeps as-of answers exact; erasure leaves nothing; the reader role cannot write."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from storage.access import AccessError, grant_reader
from storage.db import libpq_url
from storage.repository import RetentionPolicy, VectorStore
from tests.integration.storage.conftest import DIM, rating, unit, update

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 20, 12, 34, 56, tzinfo=UTC)


def _timeline(engine: Engine, user_id: str, every: timedelta, span: timedelta) -> list[datetime]:
    """History rows of `user_id`, one every `every` for `span` up to NOW, as a worker would leave them."""
    moments = []
    at = NOW - span
    while at <= NOW:
        moments.append(at)
        at += every
    with engine.begin() as conn:
        for version, created in enumerate(moments, start=1):
            conn.execute(
                text(
                    "INSERT INTO user_interest_vectors (user_id, version, model_version, vector, n_events, "
                    "last_event_ts, created_at) VALUES (:u, :v, 'm1', "
                    "CAST(array_fill(CAST(:x AS real), ARRAY[:d]) AS real[]), :v, :t, :t)"
                ),
                {"u": user_id, "v": version, "x": version / 1000, "d": DIM, "t": created},
            )
        conn.execute(
            text(
                "INSERT INTO user_current_versions (user_id, version, n_events, last_event_ts, updated_at) "
                "SELECT user_id, version, n_events, last_event_ts, created_at FROM user_interest_vectors "
                "WHERE user_id = :u ORDER BY version DESC LIMIT 1"
            ),
            {"u": user_id},
        )
    return moments


def _as_of_all(store: VectorStore, user_id: str, moments: list[datetime]) -> list[int | None]:
    out = []
    for m in moments:
        found = store.vector_as_of(user_id, m)
        out.append(None if found is None else found[0])
    return out


def test_prune_thins_history_and_keeps_as_of_exact(store: VectorStore, engine: Engine) -> None:
    policy = RetentionPolicy(keep_versions=5, keep_all=timedelta(hours=6), hourly=timedelta(days=3))
    created = _timeline(engine, "u1", timedelta(minutes=25), timedelta(days=8))
    _timeline(engine, "u2", timedelta(hours=30), timedelta(days=8))  # sparse: nothing to thin
    hour = NOW.replace(minute=0, second=0, microsecond=0)
    day = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
    # Moments whose answers retention promises to keep: every instant of the keep-all window
    # (each version's own moment and just before it), every hour boundary of the hourly tier,
    # every day boundary beyond.
    recent = [c for c in created if c > NOW - policy.keep_all]
    promised = (
        recent
        + [c - timedelta(microseconds=1) for c in recent]
        + [hour - timedelta(hours=h) for h in range(0, 72)]
        + [day - timedelta(days=d) for d in range(0, 9)]
    )
    before_u1 = _as_of_all(store, "u1", promised)
    before_u2 = _as_of_all(store, "u2", promised)
    report = store.prune(policy, now=NOW, users_per_step=1)  # one user per step: exercises slicing
    assert report.users_scanned == 2 and report.user_versions_deleted > 0
    assert _as_of_all(store, "u1", promised) == before_u1
    assert _as_of_all(store, "u2", promised) == before_u2
    with engine.connect() as conn:
        kept = (
            conn.execute(
                text("SELECT version FROM user_interest_vectors WHERE user_id = 'u1' ORDER BY version")
            )
            .scalars()
            .all()
        )
        u2_rows = conn.execute(
            text("SELECT count(*) FROM user_interest_vectors WHERE user_id = 'u2'")
        ).scalar()
    assert kept[-5:] == list(range(len(created) - 4, len(created) + 1))  # newest K
    # Bounded: K + the keep-all window + one per hour + one per day, not one per 25 minutes.
    assert len(kept) <= 5 + len(recent) + 72 + 9 < len(created) / 2
    assert u2_rows == 8 * 24 // 30 + 1
    again = store.prune(policy, now=NOW)
    assert again.user_versions_deleted == 0  # idempotent
    current = store.current("u1")
    assert current is not None and current.version == len(created)


def test_prune_keeps_young_history_and_unused_items_go(store: VectorStore, engine: Engine) -> None:
    rng = np.random.default_rng(5)
    for _ in range(3):
        store.commit_batch("m2", {"u1": update("u1", unit(rng)[0])}, [])
    store.write_item_vectors("m1", ["a", "b"], unit(rng, 2))  # no user names m1
    store.write_item_vectors("m2", ["a", "b"], unit(rng, 2))
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO model_versions (model_version, base_model, created_at) VALUES "
                "('m1', 'b', now() - interval '3 days'), ('m2', 'b', now() - interval '2 days')"
            )
        )
    report = store.prune(RetentionPolicy())
    assert report.user_versions_deleted == 0 and report.item_vectors_deleted == 2
    with engine.connect() as conn:
        assert conn.execute(text("SELECT DISTINCT model_version FROM item_vectors")).scalars().all() == ["m2"]


def test_prune_drops_all_but_the_newest_weights_of_each_model(store: VectorStore, engine: Engine) -> None:
    """Only a model's newest weights are ever loaded: older blobs go (the rows stay), per model."""
    with engine.begin() as conn:
        for model, n in (("adapter", 12), ("lora:8", 2)):
            for k in range(n):
                conn.execute(
                    text(
                        "INSERT INTO model_versions (model_version, base_model, config, weights, "
                        "weights_sha256, created_at) VALUES (:v, 'b', CAST(:c AS jsonb), :w, 'x', "
                        "now() - make_interval(mins => :age))"
                    ),
                    {"v": f"{model}@{k}", "c": f'{{"model": "{model}"}}', "w": b"w" * 64, "age": n - k},
                )
    report = store.prune(RetentionPolicy(keep_versions=10))
    assert report.weights_dropped == 2
    with engine.connect() as conn:
        kept = conn.execute(
            text("SELECT model_version FROM model_versions WHERE weights IS NOT NULL ORDER BY 1")
        ).scalars()
        rows = conn.execute(text("SELECT count(*) FROM model_versions")).scalar_one()
    assert sorted(kept) == sorted([f"adapter@{k}" for k in range(2, 12)] + ["lora:8@0", "lora:8@1"])
    assert rows == 14  # lineage, config and metrics stay
    newest = store.latest_weights("adapter")
    assert newest is not None and newest.version == "adapter@11"
    assert store.prune(RetentionPolicy(keep_versions=10)).weights_dropped == 0


def test_prune_keeps_the_weights_a_kept_version_builds_on(store: VectorStore, engine: Engine) -> None:
    """A version whose weights carry only what was added since a checkpoint names it
    (`weights_base`): the checkpoint's weights stay while such a version keeps its own."""
    with engine.begin() as conn:
        for k in range(6):
            conn.execute(
                text(
                    "INSERT INTO model_versions (model_version, base_model, config, weights, "
                    "weights_sha256, weights_base, created_at) VALUES (:v, 'b', '{\"model\": \"adapter\"}', "
                    ":w, 'x', :base, now() - make_interval(mins => :age))"
                ),
                # v0 and v3 are checkpoints; v1, v2 build on v0 and v4, v5 on v3.
                {"v": f"v{k}", "w": b"w" * 64, "base": None if k % 3 == 0 else f"v{k - k % 3}", "age": 6 - k},
            )
    assert store.prune(RetentionPolicy(keep_versions=2)).weights_dropped == 3  # v0, v1, v2
    with engine.connect() as conn:
        kept = conn.execute(text("SELECT model_version FROM model_versions WHERE weights IS NOT NULL"))
        assert sorted(kept.scalars()) == ["v3", "v4", "v5"]
    base = store.weights_of("v3")
    assert base is not None and base.weights == b"w" * 64
    assert store.weights_of("v0") is None and store.weights_of("nope") is None


def _rows_mentioning(engine: Engine, needle: str) -> dict[str, int]:
    with engine.connect() as conn:
        tables = conn.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        ).scalars()
        found = {}
        for table in tables:
            n = conn.execute(
                text(f'SELECT count(*) FROM "{table}" t WHERE strpos(CAST(t AS text), :n) > 0'),
                {"n": needle},
            ).scalar_one()
            if n:
                found[table] = n
    return found


def test_erasure_leaves_no_row_and_the_worker_rule_holds(store: VectorStore, engine: Engine) -> None:
    rng = np.random.default_rng(6)
    who, other = "erase-me-5d1c", "keep-me-77aa"
    now = datetime.now(UTC).timestamp()
    for n in range(3):
        store.commit_batch(
            "m1",
            {who: update(who, unit(rng)[0]), other: update(other, unit(rng)[0])},
            [rating(f"{who}-e{n}", who, "i1", now), rating(f"{other}-e{n}", other, "i2", now)],
            user_states={who: {"n": n}, other: {"n": n}},
        )
    assert set(_rows_mentioning(engine, who)) == {
        "applied_events",
        "user_states",
        "user_current_versions",
        "user_interest_vectors",
    }
    counts = store.erase_user(who, grace=timedelta(minutes=10))
    assert counts == {
        "applied_events": 3,
        "user_states": 1,
        "user_current_versions": 1,
        "user_interest_vectors": 3,
    }
    assert _rows_mentioning(engine, who) == {}
    assert set(_rows_mentioning(engine, other)) >= {"user_current_versions", "user_interest_vectors"}
    with engine.connect() as conn:
        audit = conn.execute(
            text("SELECT CAST(erasure_audit AS text), rows_deleted FROM erasure_audit")
        ).all()
        tomb = conn.execute(text("SELECT user_hash FROM erased_users")).scalars().all()
    assert len(audit) == 1 and audit[0][1] == counts
    assert tomb == [store.user_hash(who)]
    assert store.user_hash(who).hex() not in audit[0][0]  # the audit row cannot be tied to the user

    # In-flight events (stamped before drop_until) are dropped; the model is told to forget once.
    late = [rating("late-1", who, "i1", now + 60), rating("late-2", other, "i2", now + 60)]
    screened = store.screen_erased(late)
    assert [e.event_id for e in screened.kept] == ["late-2"]
    assert screened.dropped == 1 and screened.forget == {who}
    assert store.screen_erased(late).forget == set()
    # A writer that learned before the erasure (it never screened) cannot resurrect the user.
    unaware = VectorStore(engine, group_id="other-worker")
    written = unaware.commit_batch(
        "m1",
        {who: update(who, unit(rng)[0]), other: update(other, unit(rng)[0])},
        late,
        user_states={who: {"n": 9}},
    )
    assert written == {other: 4}
    assert _rows_mentioning(engine, who) == {}
    # Stamped after drop_until: a new life, starting at version 1.
    fresh = [rating("new-1", who, "i3", now + 3600)]
    assert [e.event_id for e in store.screen_erased(fresh).kept] == ["new-1"]
    assert store.commit_batch("m1", {who: update(who, unit(rng)[0])}, fresh) == {who: 1}
    assert store.screen_erased(fresh).forget == set()  # rebuilt after the erasure: nothing to forget


def _as_role(url: str, role: str) -> str:
    as_role = make_url(url)._replace(username=role, password=None)
    return libpq_url(as_role.render_as_string(hide_password=False))


def test_reader_role_reads_and_cannot_write(store: VectorStore, engine: Engine, store_url: str) -> None:
    rng = np.random.default_rng(7)
    store.write_item_vectors("m1", ["a", "b", "c"], unit(rng, 3))
    store.commit_batch("m1", {"u1": update("u1", unit(rng)[0])}, [])
    role = "reader_" + uuid.uuid4().hex[:8]
    grant = grant_reader(engine, role)
    assert grant.created
    assert not grant_reader(engine, role).created  # again: same grants, no error
    try:
        with psycopg.connect(_as_role(store_url, role), autocommit=True) as conn:
            assert conn.execute("SELECT version FROM user_interests_current").fetchone() == (1,)
            assert len(conn.execute("SELECT * FROM user_top_items('u1', 2)").fetchall()) == 2
            assert conn.execute("SELECT version FROM user_vector_as_of('u1', now())").fetchone() == (1,)
            assert conn.execute("SELECT count(*) FROM similar_users('u1')").fetchone() == (0,)
            writes = (
                "DELETE FROM user_current_versions",
                "INSERT INTO items (item_id, text) VALUES ('x', 'y')",
                "SELECT erase_user('u1')",
                "SELECT prune_user_vectors(1, interval '0', interval '0')",
            )
            # Refused by the role's read-only default (or, for the write functions, no EXECUTE) ...
            for statement in writes:
                refused = (psycopg.errors.ReadOnlySqlTransaction, psycopg.errors.InsufficientPrivilege)
                with pytest.raises(refused):
                    conn.execute(statement)
            # ... and by the grants once a session turns that default off.
            conn.execute("SET default_transaction_read_only = off")
            for statement in (*writes, "SELECT value FROM storage_meta", "SELECT * FROM erased_users"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE "{role}"'))
    assert store.current("u1") is not None


def test_grant_reader_refuses_a_superuser(engine: Engine) -> None:
    with engine.connect() as conn:
        me = conn.execute(text("SELECT current_user")).scalar_one()
    with pytest.raises(AccessError, match="superuser"):
        grant_reader(engine, me)
