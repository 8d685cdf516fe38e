"""Ranking metrics with expected-rank tie handling, and rating errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from models.metrics import expected_rank, rank_counts, ranking_metrics, rating_errors


def test_rank_counts_excludes_seen_items_and_counts_ties() -> None:
    scores = np.array([[0.9, 0.5, 0.5, 0.5, 0.1]])
    excluded = np.array([[True, False, False, False, False]])
    g, t = rank_counts(scores, np.array([2]), excluded)
    assert (g[0], t[0]) == (0, 2)  # item 0 is seen, so nothing beats the target; two others tie
    g, t = rank_counts(scores, np.array([2]))
    assert (g[0], t[0]) == (1, 2)


def test_nan_scores_rank_last() -> None:
    g, t = rank_counts(np.array([[np.nan, 0.2, 0.1]]), np.array([2]))
    assert (g[0], t[0]) == (1, 0)


def test_metrics_without_ties_are_the_textbook_values() -> None:
    greater = np.array([0, 4, 9, 10, 19, 25])  # ranks 1, 5, 10, 11, 20, 26
    m = ranking_metrics(greater, np.zeros_like(greater))
    ranks = greater + 1
    assert m["recall@10"].tolist() == [1, 1, 1, 0, 0, 0]
    assert m["recall@20"].tolist() == [1, 1, 1, 1, 1, 0]
    np.testing.assert_allclose(m["ndcg@10"], [1 / math.log2(r + 1) if r <= 10 else 0 for r in ranks])
    np.testing.assert_allclose(m["mrr"], 1 / ranks)


@pytest.mark.parametrize(("greater", "ties"), [(0, 0), (0, 30), (5, 9), (8, 5), (18, 4), (3, 1700)])
def test_ties_give_the_expectation_over_a_random_tie_break(greater: int, ties: int) -> None:
    m = ranking_metrics(np.array([greater]), np.array([ties]))
    ranks = np.arange(greater + 1, greater + ties + 2)
    assert m["recall@10"][0] == pytest.approx(np.mean(ranks <= 10))
    assert m["recall@20"][0] == pytest.approx(np.mean(ranks <= 20))
    assert m["ndcg@10"][0] == pytest.approx(np.mean(np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0)))
    assert m["mrr"][0] == pytest.approx(np.mean(1 / ranks))
    assert expected_rank(greater, ties) == pytest.approx(ranks.mean())


def test_a_constant_scorer_gets_the_random_baseline_not_the_catalog_order() -> None:
    n = 100
    scores = np.zeros((n, n))
    m = ranking_metrics(*rank_counts(scores, np.arange(n)))
    assert m["recall@10"].mean() == pytest.approx(0.10)
    assert m["recall@20"].mean() == pytest.approx(0.20)


def test_brute_force_over_all_tie_orders_matches() -> None:
    scores = np.array([0.3, 0.7, 0.3, 0.3, 0.1, 0.7])
    target = 2
    g, t = rank_counts(scores[None, :], np.array([target]))
    m = ranking_metrics(g, t)
    tied = [i for i in range(len(scores)) if scores[i] == scores[target]]
    mrrs = []
    for perm in itertools.permutations(tied):
        rank = 1 + int((scores > scores[target]).sum()) + perm.index(target)
        mrrs.append(1 / rank)
    assert m["mrr"][0] == pytest.approx(np.mean(mrrs))


def test_rating_errors_use_river() -> None:
    err = rating_errors([4, 2, 5], [3.5, 2.0, 4.0])
    assert err.n == 3
    assert err.mae == pytest.approx((0.5 + 0 + 1) / 3)
    assert err.rmse == pytest.approx(math.sqrt((0.25 + 0 + 1) / 3))
    assert math.isnan(rating_errors([], []).rmse)
