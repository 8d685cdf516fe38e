"""Batched writes (versions 1, 2, 3... under concurrency) and the SQL functions, on both backends."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from sqlalchemy import Engine, text

from models.core import ModelSnapshot
from storage.repository import OffsetMark, VectorStore
from tests.integration.storage.conftest import DIM, rating, unit, update

pytestmark = pytest.mark.integration


def _publish(store: VectorStore, version: str, item_vectors: np.ndarray) -> list[str]:
    ids = [f"i{n:03d}" for n in range(len(item_vectors))]
    store.write_item_vectors(version, ids, item_vectors)
    return ids


def test_batch_writes_everything_in_one_go(store: VectorStore, engine: Engine) -> None:
    rng = np.random.default_rng(1)
    vecs = unit(rng, 3)
    events = [rating("e1", "u1", "i001"), rating("e2", "u2", "i002"), rating("e1", "u1", "i001")]
    written = store.commit_batch(
        "m1",
        {"u1": update("u1", vecs[0]), "u2": update("u2", vecs[1], n=2)},
        events,
        offsets=[OffsetMark("interest.ratings", 0, 10), OffsetMark("interest.ratings", 1, 4)],
        user_states={"u1": {"n": 1}, "u2": {"n": 2}},
    )
    assert written == {"u1": 1, "u2": 1}
    written = store.commit_batch(
        "m1", {"u2": update("u2", vecs[2], n=3)}, [], offsets=[OffsetMark("interest.ratings", 0, 8)]
    )
    assert written == {"u2": 2}
    row = store.current("u2")
    assert row is not None and row.version == 2 and row.n_events == 5
    np.testing.assert_allclose(row.vector, vecs[2], rtol=1e-6)
    assert store.applied_event_ids(["e1", "e2", "e3"]) == {"e1", "e2"}
    # Offsets never move backwards (a late, smaller mark is ignored).
    assert store.stored_offsets() == {("interest.ratings", 0): 10, ("interest.ratings", 1): 4}
    assert store.load_user_states("m1") == {"u1": {"n": 1}, "u2": {"n": 2}}
    with engine.connect() as conn:
        history = conn.execute(
            text("SELECT user_id, version, n_events FROM user_interest_vectors ORDER BY 1, 2")
        ).all()
        current_at = conn.execute(
            text("SELECT updated_at FROM user_interests_current WHERE user_id = 'u2'")
        ).scalar_one()
        history_at = conn.execute(
            text("SELECT created_at FROM user_interest_vectors WHERE user_id = 'u2' AND version = 2")
        ).scalar_one()
    assert [tuple(r) for r in history] == [("u1", 1, 1), ("u2", 1, 2), ("u2", 2, 5)]
    assert current_at == history_at  # the history row is the current row, same moment


def test_wrong_width_is_refused_before_anything_is_written(store: VectorStore) -> None:
    with pytest.raises(ValueError, match=f"stores {DIM}"):
        store.commit_batch("m1", {"u1": update("u1", np.ones(DIM + 1, np.float32))}, [])
    assert store.current("u1") is None


def test_two_concurrent_writers_make_gapless_unique_versions(store_url: str, engine: Engine) -> None:
    users = [f"u{n:03d}" for n in range(60)]
    rounds = 15
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        own = VectorStore(engine, group_id=f"w{seed}")  # shares the pool: separate connections
        try:
            start.wait()
            for _ in range(rounds):
                # Overlapping, shuffled user sets: both writers fight for the same rows.
                chosen = rng.choice(users, size=40, replace=False)
                vecs = unit(rng, len(chosen))
                own.commit_batch("m1", {u: update(u, v) for u, v in zip(chosen, vecs, strict=True)}, [])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with engine.connect() as conn:
        per_user = conn.execute(
            text(
                "SELECT h.user_id, array_agg(h.version ORDER BY h.version), max(c.version), "
                "bool_and(h.created_at <= c.updated_at) "
                "FROM user_interest_vectors h JOIN user_interests_current c USING (user_id) "
                "GROUP BY h.user_id"
            )
        ).all()
        total = conn.execute(text("SELECT count(*) FROM user_interest_vectors")).scalar_one()
    assert total == 2 * rounds * 40
    for user_id, versions, current, ordered in per_user:
        assert versions == list(range(1, len(versions) + 1)), user_id
        assert current == len(versions) and ordered


def test_top_items_match_numpy_and_skip_seen(store: VectorStore) -> None:
    rng = np.random.default_rng(2)
    items = unit(rng, 40)
    ids = _publish(store, "m1", items)
    _publish(store, "m0", unit(rng, 40))  # another model version's items must not leak in
    user = unit(rng)[0]
    store.commit_batch("m1", {"u1": update("u1", user)}, [rating("e1", "u1", ids[0])])
    scores = items @ user
    best = [ids[i] for i in np.argsort(-scores)]
    top = store.top_items("u1", 5)
    assert [i for i, _ in top] == best[:5]
    np.testing.assert_allclose([s for _, s in top], np.sort(scores)[::-1][:5], rtol=1e-5)
    seen_one = store.commit_batch("m1", {}, [rating("e2", "u1", best[0])])
    assert seen_one == {}
    assert [i for i, _ in store.top_items("u1", 5, skip_seen=True)] == [b for b in best if b != ids[0]][1:6]
    assert store.top_items("nobody", 5) == []


def test_a_user_without_a_vector_gets_the_newest_versions_prior(store: VectorStore) -> None:
    rng = np.random.default_rng(5)
    ids = [f"i{n:03d}" for n in range(30)]
    old, new = unit(rng, 30), unit(rng, 30)
    old_prior, new_prior = unit(rng)[0], unit(rng)[0]
    assert store.top_items("nobody", 5) == []  # no version has a prior yet
    for version, items, prior in (("m1", old, old_prior), ("m2", new, new_prior)):
        store.publish_model(ModelSnapshot(version, None, {}, ids, items, prior=prior), "base")
    # A version without a prior (e.g. the untrained mean's) does not hide the newest one that has.
    store.publish_model(ModelSnapshot("m3", None, {}, ids, unit(rng, 30)), "base")
    scores = new @ new_prior
    top = store.top_items("nobody", 5)
    assert [i for i, _ in top] == [ids[i] for i in np.argsort(-scores)[:5]]
    np.testing.assert_allclose([s for _, s in top], np.sort(scores)[::-1][:5], rtol=1e-5)
    # A user with a vector is still served their own.
    user = unit(rng)[0]
    store.commit_batch("m1", {"u1": update("u1", user)}, [])
    assert [i for i, _ in store.top_items("u1", 3)] == [ids[i] for i in np.argsort(-(old @ user))[:3]]


def test_similar_users_by_cosine(store: VectorStore) -> None:
    rng = np.random.default_rng(3)
    vecs = unit(rng, 20)
    users = [f"u{n:02d}" for n in range(20)]
    store.commit_batch("m1", {u: update(u, v) for u, v in zip(users, vecs, strict=True)}, [])
    sims = vecs[1:] @ vecs[0]
    expected = [users[1:][i] for i in np.argsort(-sims)[:4]]
    got = store.similar_users("u00", 4)
    assert [u for u, _ in got] == expected
    np.testing.assert_allclose([s for _, s in got], np.sort(sims)[::-1][:4], rtol=1e-5)


def test_as_of_returns_the_version_current_at_that_moment(store: VectorStore, engine: Engine) -> None:
    rng = np.random.default_rng(4)
    marks = []  # (moment just after a commit, version current then)
    with engine.connect() as conn:
        before = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
    for version in range(1, 6):
        store.commit_batch("m1", {"u1": update("u1", unit(rng)[0])}, [])
        with engine.connect() as conn:
            marks.append((conn.execute(text("SELECT clock_timestamp()")).scalar_one(), version))
        time.sleep(0.01)
    assert store.vector_as_of("u1", before) is None
    for moment, version in marks:
        found = store.vector_as_of("u1", moment)
        assert found is not None and found[0] == version
        current = store.current("u1")
        assert current is not None
    np.testing.assert_allclose(store.vector_as_of("u1", marks[-1][0])[1], current.vector)  # type: ignore[index]


# What docs/storage.md tells the owner of a very large catalog to run.
ADD_HNSW = (
    "CREATE INDEX item_vectors_hnsw ON item_vectors USING hnsw (vector vector_ip_ops) "
    "WITH (m = 16, ef_construction = 64)"
)


@pytest.mark.parametrize("server_url", ["pgvector"], indirect=True)
def test_skip_seen_through_the_hnsw_index_still_finds_k(store: VectorStore, engine: Engine) -> None:
    """The user has seen more items than one HNSW search returns (ef_search = 100): the iterative
    index scan must keep going instead of returning nothing. The schema has no HNSW index since
    0005; this is the path of a catalog big enough that its owner adds one (docs/storage.md)."""
    rng = np.random.default_rng(8)
    items = unit(rng, 600)
    ids = _publish(store, "m1", items)
    user = unit(rng)[0]
    order = np.argsort(-(items @ user))
    seen = [ids[i] for i in order[:150]]
    events = [rating(f"e{n}", "u1", i) for n, i in enumerate(seen)]
    store.commit_batch("m1", {"u1": update("u1", user)}, events)
    with engine.begin() as conn:
        # At 600 rows the planner may prefer the model-version btree + a sort (exact, and
        # fine); this test is about the path a big catalog takes, so leave it only HNSW.
        conn.execute(text("DROP INDEX item_vectors_by_model"))
        conn.execute(text(ADD_HNSW))
        conn.execute(text("ANALYZE item_vectors"))
    plans: list[str] = []
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        raw.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
        # Show the plans the function really runs (auto_explain ships with the server).
        for setting in (
            "LOAD 'auto_explain'",
            "SET auto_explain.log_min_duration = 0",
            "SET auto_explain.log_nested_statements = on",
            "SET client_min_messages = log",
            "SET enable_seqscan = off",  # at this size the planner would otherwise just scan
            "SET enable_bitmapscan = off",
        ):
            conn.execute(text(setting))
        got = [r[0] for r in conn.execute(text("SELECT item_id FROM user_top_items('u1', 10, true)"))]
    assert any("item_vectors_hnsw" in p for p in plans), plans
    assert len(got) == 10 and not set(got) & set(seen)
    best_unseen = [ids[i] for i in order[150:160]]
    assert len(set(got) & set(best_unseen)) >= 8  # approximate, but close
