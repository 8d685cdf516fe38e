"""Ranking and rating metrics for the backtest, pure numpy.

Ranking metrics are computed from two counts per evaluated event, taken over
the candidate items (the catalog minus the items the user already interacted
with): `greater`, how many candidates score strictly above the true item, and
`ties`, how many other candidates score exactly the same. A model that cannot
tell items apart (all scores equal) must not be rewarded by the order of the
catalog, so ties are broken uniformly at random and every metric is its
*expected* value over that tie-break: the true item's rank is uniform over
`greater + 1 ... greater + ties + 1`.

Rating errors (RMSE, MAE) use river's metrics, which are exact running values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from river import metrics as river_metrics

RANKING_METRICS: tuple[str, ...] = ("recall@10", "recall@20", "ndcg@10", "mrr")
RATING_METRICS: tuple[str, ...] = ("rmse", "mae")


def rank_counts(
    scores: np.ndarray, target: np.ndarray, excluded: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`greater` and `ties` for each row of `scores` (events x items) against its `target` column.

    `excluded` is a boolean mask of the same shape (True = not a candidate); the
    target itself must not be excluded. NaN scores count as the lowest score.
    """
    # Two passes over the matrix, no full-size float copies: the evaluator ranks a catalog of
    # 10,000+ items for thousands of positives, and memory traffic is its cost.
    s = np.where(np.isnan(scores), -np.inf, scores) if np.isnan(scores).any() else scores
    rows = np.arange(s.shape[0])
    st = s[rows, target][:, None]
    above = s > st
    level = s == st
    if excluded is not None:
        above &= ~excluded
        level &= ~excluded
    greater = np.count_nonzero(above, axis=1)
    ties = np.count_nonzero(level, axis=1) - 1
    return greater.astype(np.int64), ties.astype(np.int64)


def _discount_prefix(k: int) -> np.ndarray:
    """D[r] = sum_{j=1..r} 1/log2(j+1), D[0] = 0."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])


def expected_recall(greater: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """P(rank <= k) with the rank uniform over greater+1 .. greater+ties+1."""
    return np.clip(k - greater, 0, ties + 1) / (ties + 1)


def expected_ndcg(greater: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """E[1/log2(rank+1) if rank <= k] — one relevant item, so the ideal DCG is 1."""
    d = _discount_prefix(k)
    hi = np.minimum(greater + ties + 1, k)
    lo = np.minimum(greater, k)
    return (d[hi] - d[lo]) / (ties + 1)


def _harmonic(n: np.ndarray) -> np.ndarray:
    # Exact for the catalog sizes seen here through a table; asymptotic beyond it.
    n = np.asarray(n, dtype=np.int64)
    limit = 1 << 16
    table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, limit + 1))])
    small = n <= limit
    out = np.empty(n.shape, dtype=np.float64)
    out[small] = table[n[small]]
    big = n[~small].astype(np.float64)
    out[~small] = np.log(big) + np.euler_gamma + 1 / (2 * big) - 1 / (12 * big**2)
    return out


def expected_mrr(greater: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """E[1/rank] = (H(greater+ties+1) - H(greater)) / (ties+1)."""
    return (_harmonic(greater + ties + 1) - _harmonic(greater)) / (ties + 1)


def ranking_metrics(greater: np.ndarray, ties: np.ndarray) -> dict[str, np.ndarray]:
    """Per-event values of every ranking metric."""
    greater = np.asarray(greater, dtype=np.int64)
    ties = np.asarray(ties, dtype=np.int64)
    return {
        "recall@10": expected_recall(greater, ties, 10),
        "recall@20": expected_recall(greater, ties, 20),
        "ndcg@10": expected_ndcg(greater, ties, 10),
        "mrr": expected_mrr(greater, ties),
    }


def expected_rank(greater: np.ndarray, ties: np.ndarray) -> np.ndarray:
    return np.asarray(greater) + 1 + np.asarray(ties) / 2


@dataclass(frozen=True, slots=True)
class RatingErrors:
    rmse: float
    mae: float
    n: int


def rating_errors(y_true: Sequence[float], y_pred: Sequence[float]) -> RatingErrors:
    rmse, mae = river_metrics.RMSE(), river_metrics.MAE()
    n = 0
    for t, p in zip(y_true, y_pred, strict=True):
        rmse.update(float(t), float(p))
        mae.update(float(t), float(p))
        n += 1
    nan = float("nan")
    return RatingErrors(rmse=rmse.get() if n else nan, mae=mae.get() if n else nan, n=n)
