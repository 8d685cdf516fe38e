"""Item co-occurrence as a count-based item feature: `item_knn`'s similarity, factorised.

Counting is instant where gradient descent is slow: a neighbourhood model knows two items go
together after their first shared user, an embedding after many steps. This keeps `item_knn`'s
counts (two items co-occur when a user's first event with one comes while the other is among
their recent behaviours; `n_i` users per item) and their cosine similarity
`S = D^-1/2 C D^-1/2`, and factorises `S ≈ F Fᵀ` at rank k (F = V Λ^1/2 over the top positive
eigenpairs) by warm-started subspace iteration, a few products per refit. Each refit's F is
rotated onto the previous one (orthogonal Procrustes, which leaves F Fᵀ unchanged), so a
learned map from the features into the interest space keeps its meaning from one refit to the
next. The features are F's rows at unit length.

Rows are catalog rows; a row with no co-occurrence yet has a zero feature. Pure numpy/scipy:
the counts are aggregates over users, like popularity counts.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

DENSE_MAX_ITEMS = 5000


class CoOccurrence:
    """Counts of item pairs within users' recent items, and a rank-k factor of their cosine."""

    def __init__(self, rank: int, seed: int = 0, iterations: int = 2) -> None:
        if rank < 1:
            raise ValueError(f"co-occurrence rank must be >= 1, got {rank}")
        self.rank = rank
        self.iterations = iterations
        self._merged = 0  # pairs counted into `counts`
        self._f = np.zeros((0, rank))  # the last refit's F, unscaled
        self.n = np.zeros(0, dtype=np.float64)  # users per item
        # Dense while the catalog is small (a refit is then a dense product), CSR beyond.
        self.counts: np.ndarray | sparse.csr_matrix = np.zeros((0, 0), dtype=np.float32)
        self._rows: list[int] = []
        self._cols: list[int] = []
        self._rng = np.random.default_rng(seed)
        self.basis = np.zeros((0, rank))  # orthonormal columns: the tracked subspace
        self.features = np.zeros((0, rank), dtype=np.float32)  # F's rows at unit length
        self.refits = 0

    def __len__(self) -> int:
        return len(self.n)

    def grow(self, size: int) -> None:
        old = len(self.n)
        if size <= old:
            return
        self.n = np.concatenate([self.n, np.zeros(size - old)])
        self.features = np.concatenate([self.features, np.zeros((size - old, self.rank), np.float32)])
        self.basis = np.concatenate([self.basis, np.zeros((size - old, self.rank))])
        self._f = np.concatenate([self._f, np.zeros((size - old, self.rank))])

    def add(self, row: int, partners: list[int]) -> None:
        """A user's first event with `row`, after `partners` (their recent distinct items)."""
        self.n[row] += 1
        if partners:
            self._rows += partners + [row] * len(partners)
            self._cols += [row] * len(partners) + partners

    def _merge(self) -> None:
        size = len(self.n)
        if self.counts.shape[0] < size:
            if size <= DENSE_MAX_ITEMS:
                grown = np.zeros((size, size), dtype=np.float32)
                grown[: self.counts.shape[0], : self.counts.shape[1]] = self._dense()
                self.counts = grown
            else:
                c = sparse.coo_matrix(self.counts)
                shape = (size, size)
                self.counts = sparse.csr_matrix((c.data, (c.row, c.col)), shape=shape, dtype=np.float32)
        if not self._rows:
            return
        r = np.asarray(self._rows, dtype=np.int64)
        c = np.asarray(self._cols, dtype=np.int64)
        self._rows, self._cols = [], []
        if isinstance(self.counts, np.ndarray):
            flat, k = np.unique(r * size + c, return_counts=True)
            self.counts.ravel()[flat] += k
        else:
            add = sparse.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(size, size))
            self.counts = (self.counts + add).tocsr()

    def _dense(self) -> np.ndarray:
        c = self.counts
        return c if isinstance(c, np.ndarray) else c.toarray()

    def refit(self) -> None:
        """Move F to the current counts: a few subspace iterations from the last basis."""
        self._merged += len(self._rows)
        self._merge()
        size = len(self.n)
        if size <= self.rank or not self._merged:
            return
        inv = np.zeros(size)
        np.divide(1.0, np.sqrt(self.n), out=inv, where=self.n > 0)
        counts = self.counts

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
        old = self._f
        if old.shape[0] and np.any(old):
            # The rotation R minimising |F R - F_old|: F Fᵀ is unchanged, the learned map keeps its meaning.
            u, _, vt = np.linalg.svd(f.T @ old)
            r = u @ vt
            f, v = f @ r, v @ r
        self.basis = v
        self._f = f
        # Unit rows: the direction says which items an item goes with; the length (how much
        # co-occurrence it has) swings with every refit and, measured, only added noise.
        norms = np.linalg.norm(f, axis=1, keepdims=True)
        self.features = (f / np.maximum(norms, 1e-12)).astype(np.float32)
        self.refits += 1
