"""item_knn: cosine co-occurrence within a recent window, recency-weighted, dense and sparse alike."""

from __future__ import annotations

import numpy as np
import pytest

import models.item_knn as item_knn
from models.events import Event, Item
from models.item_knn import ItemKNNModel
from models.registry import available


def _items(n: int) -> list[Item]:
    return [Item(item_id=f"i{k}", text=f"item {k}") for k in range(n)]


def _click(n: int, user: str, item: str) -> Event:
    return Event(event_id=f"e{n}", user_id=user, ts=float(n), kind="click", item_id=item)


def _model(n_items: int = 6, **kw: float) -> ItemKNNModel:
    m = ItemKNNModel(**kw)  # type: ignore[arg-type]
    m.upsert_items(_items(n_items))
    return m


def test_cosine_of_co_occurrences() -> None:
    m = _model()
    pairs = [("a", "i0"), ("a", "i1"), ("b", "i0"), ("b", "i1"), ("c", "i0"), ("c", "i2"), ("d", "i0")]
    m.learn([_click(n, u, i) for n, (u, i) in enumerate(pairs)])
    scores, known = m.predict_many(["d", "stranger"])
    assert known.all()
    # n = users per item: i0 4, i1 2, i2 1. C[i0, i1] = 2, C[i0, i2] = 1.
    assert scores[0, 1] == pytest.approx(2 / np.sqrt(4 * 2), abs=1e-5)
    assert scores[0, 2] == pytest.approx(1 / np.sqrt(4 * 1), abs=1e-5)
    assert scores[0, 1] > scores[0, 2] > scores[0, 3]
    # No neighbour reaches i3..i5 (no events): only the tie-break, which is zero for them.
    assert scores[0, 3] == scores[0, 4] == 0.0
    # A stranger has no recent items: popularity only orders the catalog (a tiny tie-break).
    assert scores[1].max() < 1e-5 and scores[1, 0] > scores[1, 1] > scores[1, 2]


def test_recency_weights_and_window() -> None:
    m = _model(decay=0.5, window=2)
    # Each new item co-occurs with the user's 2 most recent ones: i5 meets i1 and i2, not i0.
    log = [("x", "i0"), ("x", "i3"), ("u", "i0"), ("u", "i1"), ("u", "i2"), ("u", "i5")]
    m.learn([_click(n, u, i) for n, (u, i) in enumerate(log)])
    assert m.recent["u"] == [2, 5]
    assert m.dense is not None
    assert m.dense[0, 2] == 1 and m.dense[0, 5] == 0 and m.dense[1, 5] == 1 and m.dense[2, 5] == 1
    scores, _ = m.predict_many(["u"])
    # i3 is reached only from i0, which left u's window; i1 from both recent items, i0 from i2 only.
    assert scores[0, 3] < 1e-5
    assert scores[0, 1] > scores[0, 0] > 0.1
    # Recency: a neighbour of the most recent item counts twice (decay 0.5) what one of the older does.
    w_new, w_old = 1.0, 0.5
    n = m.n
    expect_i1 = (w_old * 1 / np.sqrt(n[2]) + w_new * 1 / np.sqrt(n[5])) / np.sqrt(n[1])
    assert scores[0, 1] == pytest.approx(expect_i1, abs=1e-5)
    # A repeat adds no co-occurrence, but makes the item most recent again.
    before = m.dense.copy()
    m.learn([_click(99, "u", "i1")])
    assert m.recent["u"] == [5, 1]
    np.testing.assert_array_equal(m.dense, before)


def test_sparse_storage_scores_like_the_dense_one(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    dense = _model(40, window=5)
    monkeypatch.setattr(item_knn, "DENSE_MAX_ITEMS", 10)
    sparse = _model(40, window=5)
    assert sparse.dense is None and sparse.csr is not None
    n = 0
    for _ in range(6):
        batch = []
        for _ in range(50):
            batch.append(_click(n, f"u{rng.integers(8)}", f"i{rng.integers(40)}"))
            n += 1
        dense.learn(batch)
        sparse.learn(batch)
        users = [f"u{k}" for k in range(8)]
        np.testing.assert_allclose(sparse.predict_many(users)[0], dense.predict_many(users)[0], atol=1e-6)
    sparse._flush()
    np.testing.assert_array_equal(sparse.csr.toarray(), dense.dense)


def test_registered_and_state_round_trip() -> None:
    assert "item_knn" in available()
    m = _model()
    m.learn([_click(0, "a", "i0"), _click(1, "a", "i1")])
    state = m.get_user_state("a")
    assert state == {"recent": ["i0", "i1"], "had": ["i0", "i1"], "n_events": 2}
    other = _model()
    other.set_user_state("a", state)
    assert other.recent["a"] == [0, 1]
    m.forget_user("a")
    assert m.get_user_state("a") is None
    with pytest.raises(ValueError, match="window"):
        ItemKNNModel(arg="0")
