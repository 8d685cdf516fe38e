"""The co-occurrence factors: F Fᵀ follows item_knn's cosine, and refits keep F's frame."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from models.finetune.cooccurrence import CoOccurrence


def _two_groups(cooc: CoOccurrence, users: int, rng: np.random.Generator) -> None:
    """Users who each take items of one group (0-9 or 10-19), in their own order."""
    for u in range(users):
        group = np.arange(10) + 10 * (u % 2)
        had: list[int] = []
        for row in rng.permutation(group)[:6]:
            cooc.add(int(row), list(had))
            had.append(int(row))


def _cosine(cooc: CoOccurrence) -> np.ndarray:
    assert cooc.counts.dense is not None
    c = cooc.counts.dense.astype(np.float64)
    n = cooc.counts.n
    inv = np.where(n > 0, 1.0 / np.sqrt(np.maximum(n, 1)), 0.0)
    return inv[:, None] * c * inv[None, :]


def test_factors_rank_within_group_above_across() -> None:
    cooc = CoOccurrence(rank=4, seed=0)
    cooc.grow(24)  # 4 items nobody takes: zero features
    _two_groups(cooc, 40, np.random.default_rng(0))
    cooc.refit()
    f = cooc.factors
    sim = f @ f.T
    assert np.allclose(np.linalg.norm(cooc.features[:20], axis=1), 1.0, atol=1e-5)
    assert sim[:10, :10].mean() > 5 * abs(sim[:10, 10:20].mean())
    assert sim[10:20, 10:20].mean() > 5 * abs(sim[10:20, :10].mean())
    assert not np.any(cooc.features[20:])
    # At a rank that holds the whole spectrum the factors reproduce the cosine's positive part.
    s = _cosine(cooc)
    lam, v = np.linalg.eigh(s)
    top = (v * np.clip(lam, 0, None)) @ v.T
    full = CoOccurrence(rank=23, seed=0, iterations=20)
    full.grow(24)
    _two_groups(full, 40, np.random.default_rng(0))
    full.refit()
    g = full.factors
    assert np.abs(g @ g.T - top).max() < 0.05 * np.abs(top).max()


def test_refit_keeps_the_frame() -> None:
    """More of the same counts move F little: a map learned on the last F still applies."""
    rng = np.random.default_rng(1)
    cooc = CoOccurrence(rank=4, seed=0)
    cooc.grow(20)
    _two_groups(cooc, 40, rng)
    cooc.refit()
    before = cooc.features.copy()
    _two_groups(cooc, 4, rng)
    cooc.refit()
    assert cooc.refits == 2
    assert np.linalg.norm(cooc.features - before) < 0.2 * np.linalg.norm(before)


def test_rank_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rank"):
        CoOccurrence(rank=0)


def test_sparse_counts_factor_like_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above DENSE_MAX_ITEMS the counts are CSR (`models.pair_counts`); the factors are the same."""
    import models.finetune.cooccurrence as module

    out = []
    for dense_max in (5000, 10):
        monkeypatch.setattr(module, "DENSE_MAX_ITEMS", dense_max)
        cooc = CoOccurrence(rank=4, seed=0)
        cooc.grow(20)
        _two_groups(cooc, 20, np.random.default_rng(2))
        cooc.refit()
        cooc.grow(30)  # the catalog grows between refits
        _two_groups(cooc, 20, np.random.default_rng(3))
        cooc.refit()
        out.append(cooc.factors @ cooc.factors.T)
    assert isinstance(cooc.counts.csr, sparse.csr_matrix)
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)


def _upper(cooc: CoOccurrence) -> dict[tuple[int, int], float]:
    rows, cols, counts = cooc.counts.upper()
    return {(int(r), int(c)): float(n) for r, c, n in zip(rows, cols, counts, strict=True)}


@pytest.mark.parametrize("dense_max", [5000, 10])
def test_pruning_keeps_each_items_strongest_pairs_within_the_bound(
    monkeypatch: pytest.MonkeyPatch, dense_max: int
) -> None:
    """`prune(k)` past k pairs keeps exactly 0.8 k (dense or sparse counts alike): first every item's
    strongest partner by cosine, so a rare pair survives the popular items' many weak ones;
    users per item stay; the same counts prune the same way."""
    monkeypatch.setattr("models.finetune.cooccurrence.DENSE_MAX_ITEMS", dense_max)

    def counted() -> CoOccurrence:
        cooc = CoOccurrence(rank=2, seed=0)
        cooc.grow(24)
        _two_groups(cooc, 40, np.random.default_rng(2))
        cooc.add(21, [22])  # one user's pair of two rare items
        return cooc

    cooc = counted()
    before = _upper(cooc)
    n = cooc.counts.n.copy()
    assert cooc.prune(len(before)) == 0 and _upper(cooc) == before
    assert cooc.prune(25) == len(before) - 20  # past the bound: cut to 0.8 of it
    keep = 20
    after = _upper(cooc)
    assert len(after) == keep and all(before[p] == c for p, c in after.items())
    assert (21, 22) in after
    np.testing.assert_array_equal(cooc.counts.n, n)

    def cosine(p: tuple[int, int]) -> float:
        return before[p] / np.sqrt(n[p[0]] * n[p[1]])

    for item in range(20):
        mine = [p for p in before if item in p]
        best = max(map(cosine, mine))
        assert any(cosine(p) == best for p in mine if p in after), f"item {item} lost its nearest partner"
    again = counted()
    again.prune(25)
    assert _upper(again) == after
    cooc.refit()  # the pruned counts factorise
    assert np.any(cooc.features[:20])


@pytest.mark.parametrize("dense_max", [5000, 10])
def test_a_state_between_checkpoints_carries_every_pair_since(
    monkeypatch: pytest.MonkeyPatch, dense_max: int
) -> None:
    """The pairs since the last checkpoint, in the order they came, whether merged by a refit or
    a growing catalog or still pending; loaded onto the checkpoint they give the same counts."""
    monkeypatch.setattr("models.finetune.cooccurrence.DENSE_MAX_ITEMS", dense_max)
    cooc = CoOccurrence(rank=2, seed=0)
    cooc.grow(20)
    _two_groups(cooc, 10, np.random.default_rng(4))
    checkpoint = cooc.state(20, checkpoint=True)
    since = [(3, 1), (3, 2), (7, 3)]
    cooc.add(3, [1, 2])
    cooc.refit()
    cooc.add(7, [3])
    cooc.grow(25)  # merges what is pending
    since += [(21, 7), (21, 3)]
    cooc.add(21, [7, 3])
    state = cooc.state(25, checkpoint=False)
    assert [tuple(p) for p in state["cooc_pairs"].tolist()] == since
    restored = CoOccurrence(rank=2, seed=0)
    restored.grow(25)
    restored.load(state, np.arange(25), (checkpoint, np.arange(20)))
    restored.counts.flush()
    cooc.counts.flush()
    np.testing.assert_array_equal(
        sparse.csr_matrix(restored.counts.matrix).toarray(), sparse.csr_matrix(cooc.counts.matrix).toarray()
    )
