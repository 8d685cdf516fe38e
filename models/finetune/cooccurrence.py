"""Item co-occurrence as a count-based item feature: `item_knn`'s similarity, factorised.

Counting is instant where gradient descent is slow: a neighbourhood model knows two items go
together after their first shared user, an embedding after many steps. This keeps `item_knn`'s
counts (the same `models.pair_counts.PairCounts`: two items co-occur when a user's first event
with one comes while the other is among their recent behaviours; `n_i` users per item) and
their cosine similarity `S = D^-1/2 C D^-1/2`, and factorises `S ≈ F Fᵀ` at rank k
(F = V Λ^1/2 over the top positive eigenpairs) by warm-started subspace iteration, a few
products per refit. Each refit's F is
rotated onto the previous one (orthogonal Procrustes, which leaves F Fᵀ unchanged), so a
learned map from the features into the interest space keeps its meaning from one refit to the
next. The features are F's rows at unit length.

Rows are catalog rows; a row with no co-occurrence yet has a zero feature. Pure numpy/scipy:
the counts are aggregates over users, like popularity counts.

A restarted worker must go on counting from where the published version stood, or its refits
drift away from what a backtest measures. The whole counts are ~5 MB on ML-100K and grow with
the catalog, too much for every version's weights, so a version carries either all the counts
(a checkpoint, every few publishes) or the pairs added since the last one, which it names
(`checkpoint`, `pairs_since`, `restore`).
"""

from __future__ import annotations

import numpy as np

from models.pair_counts import DENSE_MAX_ITEMS, PairCounts


class CoOccurrence:
    """Counts of item pairs within users' recent items, and a rank-k factor of their cosine."""

    def __init__(self, rank: int, seed: int = 0, iterations: int = 2) -> None:
        if rank < 1:
            raise ValueError(f"co-occurrence rank must be >= 1, got {rank}")
        self.rank = rank
        self.iterations = iterations
        self.counts = PairCounts(DENSE_MAX_ITEMS)
        self._rng = np.random.default_rng(seed)
        self.basis = np.zeros((0, rank))  # orthonormal columns: the tracked subspace
        self.factors = np.zeros((0, rank))  # F, rotated onto the last refit's
        self.features = np.zeros((0, rank), dtype=np.float32)  # F's rows at unit length
        self.refits = 0
        # Pairs (item, partner) added since the last checkpoint, in the order they came.
        self._since_rows: list[int] = []
        self._since_cols: list[int] = []

    def grow(self, size: int) -> None:
        old = self.counts.size
        if size <= old:
            return
        self.counts.grow(size)
        pad = np.zeros((size - old, self.rank))
        self.basis = np.concatenate([self.basis, pad])
        self.factors = np.concatenate([self.factors, pad])
        self.features = np.concatenate([self.features, pad.astype(np.float32)])

    def add(self, row: int, partners: list[int]) -> None:
        """A user's first event with `row`, after `partners` (their recent distinct items)."""
        self.counts.add(row, partners)
        if partners:
            self._since_rows += [row] * len(partners)
            self._since_cols += partners

    def pairs_since(self) -> np.ndarray:
        """(m, 2) int32: the pairs (item, partner) added since the last `checkpoint`."""
        rows = np.asarray(self._since_rows, dtype=np.int32)
        return np.stack([rows, np.asarray(self._since_cols, dtype=np.int32)], 1)

    def checkpoint(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All the counts, as the upper triangle (rows, cols, counts); later `pairs_since`
        are relative to it."""
        self._since_rows, self._since_cols = [], []
        return self.counts.upper()

    def restore(
        self,
        users: np.ndarray,
        factors: np.ndarray,
        counts: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        since: np.ndarray,
    ) -> None:
        """State saved by another instance, its rows already mapped onto this catalog (`grow`
        first): users per item, the factors, the counts of the checkpoint (None: not available,
        counting goes on from the pairs since) and the pairs added since it."""
        size = self.counts.size
        self.counts = PairCounts(self.counts.dense_max)
        self.counts.grow(size)
        self.counts.n[:] = users[:size]
        if counts is not None:
            self.counts.add_counts(*counts)
        self.counts.add_counts(since[:, 0], since[:, 1], np.ones(len(since), dtype=np.float32))
        self._since_rows, self._since_cols = since[:, 0].tolist(), since[:, 1].tolist()
        self.factors = factors[:size].astype(np.float64)
        self.basis = np.zeros_like(self.factors)
        if np.any(self.factors):
            self.basis, _ = np.linalg.qr(self.factors)  # the subspace the next refit starts from
        norms = np.linalg.norm(self.factors, axis=1, keepdims=True)
        self.features = (self.factors / np.maximum(norms, 1e-12)).astype(np.float32)

    def refit(self) -> None:
        """Move F to the current counts: a few subspace iterations from the last basis."""
        self.counts.flush()
        size = self.counts.size
        if size <= self.rank or not self.counts.pairs:
            return
        inv = self.counts.inverse_sqrt_users()
        counts = self.counts.matrix

        def s(v: np.ndarray) -> np.ndarray:  # S v without forming S = D^-1/2 C D^-1/2
            return inv[:, None] * np.asarray(counts @ (inv[:, None] * v))

        v = self.basis
        iterations = self.iterations
        if not np.any(v):
            v = self._rng.standard_normal((size, self.rank))
            iterations = 4 * self.iterations  # a cold start: no subspace to start from
        for _ in range(iterations):
            v, _ = np.linalg.qr(s(v))
        # Rayleigh–Ritz within the subspace: its eigenpairs, negative ones dropped (F Fᵀ keeps
        # what two items share, not what sets them apart).
        t = v.T @ s(v)
        lam, w = np.linalg.eigh((t + t.T) / 2)
        v = v @ w
        f = v * np.sqrt(np.clip(lam, 0.0, None))[None, :]
        old = self.factors
        if np.any(old):
            # The rotation R minimising |F R - F_old|: F Fᵀ is unchanged, the learned map keeps its meaning.
            u, _, vt = np.linalg.svd(f.T @ old)
            r = u @ vt
            f, v = f @ r, v @ r
        self.basis = v
        self.factors = f
        # Unit rows: the direction says which items an item goes with; the length (how much
        # co-occurrence it has) swings with every refit and, measured, only added noise.
        norms = np.linalg.norm(f, axis=1, keepdims=True)
        self.features = (f / np.maximum(norms, 1e-12)).astype(np.float32)
        self.refits += 1
