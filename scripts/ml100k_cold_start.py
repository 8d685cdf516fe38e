"""Why cold-start figures on ML-100K are high for every model (a check for leakage).

    python scripts/ml100k_cold_start.py [../shared/data/ml-100k]

Ranks each user's first event, when it is a positive (rating >= 4), with two counts of
*earlier* events only, decayed with a 30-day half-life: every rating (the `popularity`
baseline), and only the ratings users gave among their first `--first` events. If
new users' first ratings concentrate on the films that earlier new users rated first
(MovieLens' sign-up asked for ratings of films it showed), the second ranks them far better,
with nothing from the future: a model can learn it (from profiles and the user-position
signal), so high cold-start figures need no leak.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.sources import movielens_ratings  # noqa: E402


def expected_metrics(counts: np.ndarray, item: int) -> tuple[float, float]:
    """NDCG@10 and Recall@20 of `item` under `counts`, ties at their expected rank."""
    greater = int((counts > counts[item]).sum())
    ties = int((counts == counts[item]).sum()) - 1
    ranks = np.arange(greater + 1, greater + ties + 2)
    ndcg = float(np.mean(np.where(ranks <= 10, 1.0 / np.log2(ranks + 1), 0.0)))
    return ndcg, float(np.mean(ranks <= 20))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", default=str(ROOT / ".." / "shared" / "data" / "ml-100k"))
    p.add_argument("--first", type=int, default=20, help="a user's first N ratings count as sign-up ratings")
    p.add_argument("--half-life-days", type=float, default=30.0)
    a = p.parse_args()
    ratings = movielens_ratings(Path(a.data))  # event-time order, as the backtest replays them
    ids = {i: k for k, i in enumerate(sorted({r["item_id"] for r in ratings}))}
    every, first = np.zeros(len(ids)), np.zeros(len(ids))
    n_seen: dict[str, int] = {}
    scores: dict[str, list[tuple[float, float]]] = {"every rating": [], "first ratings only": []}
    t_prev = None
    for r in ratings:
        t = r["ts"] / 1000.0
        if t_prev is not None:
            decay = 0.5 ** ((t - t_prev) / (a.half_life_days * 86400.0))
            every *= decay
            first *= decay
        t_prev = t
        item, k = ids[r["item_id"]], n_seen.get(r["user_id"], 0)
        if k == 0 and r["rating"] >= 4:  # the first event is ranked before it is counted
            scores["every rating"].append(expected_metrics(every, item))
            scores["first ratings only"].append(expected_metrics(first, item))
        every[item] += 1
        if k < a.first:
            first[item] += 1
        n_seen[r["user_id"]] = k + 1
    for name, values in scores.items():
        ndcg, recall = np.mean(values, axis=0)
        print(f"{name:20s} cold positives {len(values)}  NDCG@10 {ndcg:.4f}  Recall@20 {recall:.4f}")


if __name__ == "__main__":
    main()
