"""Migrations: from an empty database, and from 0001 holding data, to the newest schema."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from sqlalchemy import text

from storage.db import current_revision, downgrade, make_engine, upgrade
from storage.repository import VectorStore
from storage.vectors import Backend, recorded_backend
from tests.integration.storage.conftest import DIM, update

pytestmark = pytest.mark.integration

HEAD = "0006"


def _column_type(conn, table: str) -> str:  # type: ignore[no-untyped-def]
    return conn.execute(
        text(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = CAST(:t AS regclass) AND attname = 'vector'"
        ),
        {"t": table},
    ).scalar_one()


def test_empty_database_to_head_and_back(new_database: Callable[[], str], server_kind: str) -> None:
    url = new_database()
    upgrade(url)  # default width: 384
    assert current_revision(url) == HEAD
    eng = make_engine(url)
    with eng.connect() as conn:
        backend = recorded_backend(conn)
        expected = "vector(384)" if backend is Backend.PGVECTOR else "real[]"
        for table in ("item_vectors", "user_interest_vectors", "user_interests_current"):
            assert _column_type(conn, table) == expected
        functions = set(
            conn.execute(
                text("SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace")
            ).scalars()
        )
        wanted = {"user_top_items", "user_vector_as_of", "similar_users", "prune_user_vectors", "erase_user"}
        assert wanted <= functions
        has_hnsw = conn.execute(text("SELECT to_regclass('item_vectors_hnsw') IS NOT NULL")).scalar()
    eng.dispose()
    # The embedded server has pgvector; Debian's postgresql-15 does not.
    assert backend is (Backend.PGVECTOR if server_kind == "pgvector" else Backend.ARRAY)
    assert not has_hnsw  # 0005: a version's items are scored exactly (its btree), publishes stay cheap
    downgrade(url, "0001")
    assert current_revision(url) == "0001"
    upgrade(url)
    assert current_revision(url) == HEAD


def _seed_0001(url: str) -> Backend:
    """Rows as a 0001 deployment wrote them (plain SQL, untyped vectors)."""
    eng = make_engine(url)
    with eng.begin() as conn:
        backend = recorded_backend(conn)

        def vec(values: list[float]) -> str:
            body = ",".join(str(v) for v in values)
            return f"'[{body}]'::vector" if backend is Backend.PGVECTOR else f"'{{{body}}}'::real[]"

        item_a = [1.0] + [0.0] * (DIM - 1)
        item_b = [0.0, 1.0] + [0.0] * (DIM - 2)
        user_1 = [0.6, 0.8] + [0.0] * (DIM - 2)
        conn.execute(text("INSERT INTO model_versions (model_version, base_model) VALUES ('m1', 'base')"))
        conn.execute(
            text(f"INSERT INTO item_vectors VALUES ('a', 'm1', {vec(item_a)}), ('b', 'm1', {vec(item_b)})")
        )
        conn.execute(
            text(
                "INSERT INTO user_interest_vectors (user_id, version, model_version, vector, n_events, "
                f"last_event_ts, created_at) VALUES ('u1', 1, 'm1', {vec(user_1)}, 2, now(), "
                "now() - interval '1 hour')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO user_interests_current (user_id, version, model_version, vector, n_events, "
                f"last_event_ts, updated_at) VALUES ('u1', 1, 'm1', {vec(user_1)}, 2, now(), "
                "now() - interval '1 hour')"
            )
        )
        conn.execute(text("INSERT INTO applied_events VALUES ('e1', 'u1', 'rating', 'b', now(), 4.0)"))
        conn.execute(text("INSERT INTO user_states VALUES ('u1', 'm1', '{\"n\": 2}', now())"))
        conn.execute(text("INSERT INTO consumed_offsets VALUES ('g', 'interest.ratings', 0, 7, now())"))
    eng.dispose()
    return backend


def test_0001_with_data_to_head(new_database: Callable[[], str]) -> None:
    url = new_database()
    upgrade(url, "0001")
    _seed_0001(url)
    upgrade(url, vector_dim=DIM)
    assert current_revision(url) == HEAD
    eng = make_engine(url)
    store = VectorStore(eng, group_id="g")
    with eng.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM applied_events")).scalar_one() == 1
        assert conn.execute(text("SELECT state FROM user_states")).scalar_one() == {"n": 2}
    assert store.stored_offsets() == {("interest.ratings", 0): 7}
    # The old rows answer the new functions ...
    assert [i for i, _ in store.top_items("u1", 2)] == ["b", "a"]
    assert [i for i, _ in store.top_items("u1", 2, skip_seen=True)] == ["a"]
    old = store.vector_as_of("u1", store_now(eng))
    assert old is not None and old[0] == 1
    np.testing.assert_allclose(old[1][:2], [0.6, 0.8], rtol=1e-6)
    # ... and the next write continues the same version sequence.
    written = store.commit_batch("m1", {"u1": update("u1", np.ones(DIM, np.float32) / np.sqrt(DIM))}, [])
    assert written == {"u1": 2}
    with eng.connect() as conn:
        assert conn.execute(
            text("SELECT array_agg(version ORDER BY version) FROM user_interest_vectors")
        ).scalar_one() == [1, 2]
    eng.dispose()


def test_upgrade_refuses_other_width_with_a_clear_message(new_database: Callable[[], str]) -> None:
    url = new_database()
    upgrade(url, "0001")
    _seed_0001(url)
    with pytest.raises(RuntimeError, match=f"set ISTREAM_VECTOR_DIM={DIM}"):
        upgrade(url, vector_dim=DIM * 2)
    assert current_revision(url) == "0001"  # nothing half-done


def store_now(eng):  # type: ignore[no-untyped-def]
    with eng.connect() as conn:
        return conn.execute(text("SELECT clock_timestamp()")).scalar_one()
