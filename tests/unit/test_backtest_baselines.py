"""The baselines behind the backtest: exact vectors for BiasedMF, decayed counts for popularity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.baselines import BiasedMFModel, PopularityModel
from models.events import Event, Item


def _items(n: int) -> list[Item]:
    return [Item(item_id=f"i{k}", text=f"item {k}") for k in range(n)]


def _rating(n: int, user: str, item: str, rating: float, ts: float = 0.0) -> Event:
    return Event(event_id=f"e{n}", user_id=user, ts=ts, kind="rating", item_id=item, rating=rating)


def test_biased_mf_vectors_reproduce_rivers_prediction_batch_after_batch() -> None:
    rng = np.random.default_rng(0)
    model = BiasedMFModel(seed=1)
    model.upsert_items(_items(12))
    n = 0
    for _batch in range(4):
        events = []
        for _ in range(30):
            events.append(
                _rating(n, f"u{rng.integers(5)}", f"i{rng.integers(10)}", float(rng.integers(1, 6)))
            )
            n += 1
        model.learn(events)
        scores, known = model.predict_many(["u0", "u1", "stranger"])
        assert known.all()
        for row, user in enumerate(["u0", "u1"]):
            for col, item in enumerate(model.item_ids()[:10]):
                assert scores[row, col] == pytest.approx(model.mf.predict_one(user, item), abs=1e-9)
        # A stranger is ranked as river would predict for them: mu + b_i.
        mu = model.mf.global_mean.get()
        for col, item in enumerate(model.item_ids()[:10]):
            assert scores[2, col] == pytest.approx(mu + model.mf.i_biases[item], abs=1e-9)
        # Items river never met score mu + b_u, without inventing random factors for them.
        assert "i11" not in model.mf.i_latents
    assert model.predict_rating("u0", "i3") == pytest.approx(model.mf.predict_one("u0", "i3"))
    assert model.predict_rating("stranger", "i3") is None


def test_popularity_decays_with_event_time() -> None:
    model = PopularityModel(half_life_days=1.0)
    model.upsert_items(_items(3))
    day = 86400.0
    model.learn([_rating(0, "a", "i0", 5, ts=0.0), _rating(1, "b", "i0", 5, ts=0.0)])
    model.learn([_rating(2, "a", "i1", 5, ts=2 * day)])
    scores, _ = model.predict_many(["anyone"])
    # i0: two interactions two half-lives ago; i1: one now.
    assert scores[0, 0] == pytest.approx(2 * 0.25)
    assert scores[0, 1] == pytest.approx(1.0)
    assert scores[0, 2] == 0.0
    assert model.item_matrix()[:, 0] == pytest.approx(np.log1p([0.5, 1.0, 0.0]))
    with pytest.raises(ValueError, match="half-life"):
        PopularityModel(arg="-3")
    assert math.isclose(PopularityModel(arg="7").half_life_s, 7 * day)
