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
(`state`, `load`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.pair_counts import PairCounts

PRUNE_TO = 0.8  # a cut of the counts keeps this share of their bound
# Dense counts up to this many items, CSR beyond: 2,000² float32 is 16 MB, what CSR takes for
# the default bound of a million pairs (both directions, index and value), so the bound holds
# memory at any catalog size (`item_knn`'s 5,000 would be 100 MB dense).
DENSE_MAX_ITEMS = 2000


class CoOccurrence:
    """Counts of item pairs within users' recent items, and a rank-k factor of their cosine."""

    def __init__(self, rank: int, seed: int = 0, iterations: int = 2) -> None:
        if rank < 1:
            raise ValueError(f"co-occurrence rank must be >= 1, got {rank}")
        self.rank = rank
        self.iterations = iterations
        self.counts = PairCounts(DENSE_MAX_ITEMS, journal=True)  # the journal: pairs since the checkpoint
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

    def state(self, n: int, checkpoint: bool) -> dict[str, np.ndarray]:
        """What a restart goes on from, for the first `n` rows: users per item and the factors,
        and either all the counts (`checkpoint`; later states' pairs are relative to it) or the
        pairs (item, partner) added since the last checkpoint."""
        out = {
            "cooc_users": self.counts.n[:n].astype(np.float32),
            "cooc_factors": self.factors[:n].astype(np.float32),
        }
        if checkpoint:
            rows, cols, counts = self.counts.upper()
            self.counts.journal = []  # after `upper`, whose flush journals the pending pairs
            out["cooc_counts"] = np.stack([rows, cols], 1)
            out["cooc_counts_n"] = counts
        else:
            out["cooc_pairs"] = self.counts.journal_pairs()
        return out

    def prune(self, max_pairs: int) -> int:
        """Past `max_pairs` item pairs (unordered), cut them to `PRUNE_TO` of that, each item's
        strongest first; returns how many were dropped.

        The counts grow with the stream (every first event with an item pairs it with up to
        `history` recent ones; on Last.fm's sparse catalog nearly every pair is new), so without
        a bound memory and checkpoints grow without end. The cut is item-kNN's usual pruning
        spread over the catalog: a pair's rank is its place among the partners (by cosine) of
        whichever of its two items places it higher, and pairs are kept in order of that rank,
        so every item keeps its nearest neighbours and a rare item, with few partners, keeps
        them all. Cutting below the bound makes a cut (a sort of all pairs) come once in many
        checkpoints rather than at each one once the bound is reached."""
        if self.counts.distinct_pairs() <= max_pairs:
            return 0  # the common case, without listing the pairs: a checkpoint lists them next
        rows, cols, counts = self.counts.upper()
        m = len(rows)
        n = self.counts.n
        cosine = counts / np.sqrt(np.maximum(n[rows] * n[cols], 1.0))
        ends = np.concatenate([rows, cols])
        partners = np.concatenate([cols, rows])
        order = np.lexsort((partners, -np.concatenate([cosine, cosine]), ends))
        sorted_ends = ends[order]
        first = np.searchsorted(sorted_ends, sorted_ends, side="left")
        place = np.empty(2 * m, dtype=np.int64)
        place[order] = np.arange(2 * m) - first
        rank = np.minimum(place[:m], place[m:])
        target = int(max_pairs * PRUNE_TO)
        keep = np.lexsort((cols, rows, -cosine, rank))[:target]
        size = self.counts.size
        kept = PairCounts(self.counts.dense_max, journal=True)
        kept.grow(size)
        kept.n[:] = n
        kept.add_counts(rows[keep], cols[keep], counts[keep])
        kept.journal = self.counts.journal  # what came since the checkpoint still came
        self.counts = kept
        return m - target

    def load(
        self,
        saved: Mapping[str, np.ndarray],
        row_of: np.ndarray,
        checkpoint: tuple[Mapping[str, np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """A `state` saved by another instance, its rows mapped onto this catalog by `row_of`
        (-1: not in it; `grow` first). A state of pairs since a checkpoint takes that checkpoint's
        state and row map in `checkpoint` (None: not available, counting goes on from the pairs)."""
        size = self.counts.size
        known = row_of >= 0

        def mapped(pairs: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            r, c = rows[pairs[:, 0]], rows[pairs[:, 1]]
            keep = (r >= 0) & (c >= 0)
            return r[keep], c[keep], keep

        self.counts = PairCounts(self.counts.dense_max, journal=True)
        self.counts.grow(size)
        self.counts.n[row_of[known]] = saved["cooc_users"][known]
        full = (saved, row_of) if "cooc_counts" in saved else checkpoint
        if full is not None:
            r, c, keep = mapped(full[0]["cooc_counts"], full[1])
            self.counts.add_counts(r, c, full[0]["cooc_counts_n"][keep])
        r, c, _ = mapped(saved.get("cooc_pairs", np.zeros((0, 2), dtype=np.int64)), row_of)
        self.counts.add_counts(r, c, np.ones(len(r), dtype=np.float32))
        self.counts.journal = [np.stack([r, c], 1).astype(np.int32)]
        factors = np.zeros((size, self.rank))
        factors[row_of[known]] = saved["cooc_factors"][known]
        self.basis = np.zeros_like(factors)
        if np.any(factors):
            self.basis, _ = np.linalg.qr(factors)  # the subspace the next refit starts from
        self._set_factors(factors)

    def _set_factors(self, f: np.ndarray) -> None:
        self.factors = f
        # Unit rows: the direction says which items an item goes with; the length (how much
        # co-occurrence it has) swings with every refit and, measured, only added noise.
        norms = np.linalg.norm(f, axis=1, keepdims=True)
        self.features = (f / np.maximum(norms, 1e-12)).astype(np.float32)

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
        self._set_factors(f)
        self.refits += 1
