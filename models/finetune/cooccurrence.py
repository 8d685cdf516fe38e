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
