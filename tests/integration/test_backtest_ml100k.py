"""The protocol on the real ML-100K stream reproduces the issue's reference baseline figures.

Popularity and river's BiasedMF only (no base model to load), so it takes seconds. The
bands are wide enough for harmless changes and narrow enough to catch a protocol change
(a leak of the answer, a wrong exclusion or tie rule moves these figures a lot).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.backtest import BacktestConfig, build_models, load_movielens, run_backtest
from stream.settings import Settings

pytestmark = pytest.mark.slow


def test_reference_baselines_on_ml100k(ml100k: Path) -> None:
    data = load_movielens(ml100k)
    assert len(data.events) == 100_000 and len(data.items) == 1682 and not data.rejected
    models = build_models(["popularity", "biased_mf"], Settings(seed=0))
    res = run_backtest(models, data, BacktestConfig(batch_size=100, progress=False))
    warm = res.totals("warm")
    # Reference: popularity NDCG@10 0.050, Recall@20 0.161; BiasedMF NDCG@10 0.034.
    assert 0.045 <= warm["popularity"]["ndcg@10"] <= 0.055
    assert 0.15 <= warm["popularity"]["recall@20"] <= 0.17
    assert 0.030 <= warm["biased_mf"]["ndcg@10"] <= 0.038
    assert warm["popularity"]["n"] == res.counts["ranked"] - res.counts["cold"]
    # Only positives in a user's first timestamp tie group are cold start (a tie is judged whole).
    first_ts: dict[str, float] = {}
    for e in data.events:
        first_ts.setdefault(e.user_id, e.ts)
    in_first_group = sum(
        1 for e in data.events if e.ts == first_ts[e.user_id] and e.rating is not None and e.rating >= 4
    )
    assert 0 < res.counts["cold"] <= in_first_group
    tail = res.totals("tail")
    assert 0 < tail["popularity"]["n"] < warm["popularity"]["n"] / 4
    rmse = res.rating_totals()["biased_mf"]["rmse"]
    assert 0.9 < rmse < 1.1
