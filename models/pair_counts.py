"""Counts of item pairs and of users per item: what `item_knn` and the co-occurrence factors
of the fine-tuned models (`models.finetune.cooccurrence`) both count.

The pair counts are symmetric, a dense matrix for catalogs up to `dense_max` items (one
`np.unique` per flush), otherwise a CSR matrix plus a buffer of new pairs merged when the
buffer outgrows the matrix (amortised), or whenever a caller forces it. The buffer holds each
pair once, (item, partner); a flush adds both directions.

With `journal`, each flush also keeps the pairs it merged, packed: what a restart needs to go
on from a checkpoint of the counts (`models.finetune.cooccurrence`) is every pair added since.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

DENSE_MAX_ITEMS = 5000


class PairCounts:
    def __init__(self, dense_max: int = DENSE_MAX_ITEMS, journal: bool = False) -> None:
        self.dense_max = dense_max
        self.n = np.zeros(0, dtype=np.float64)  # users per item
        self.dense: np.ndarray | None = None
        self.csr: sparse.csr_matrix | None = None
        self.pairs = 0  # pairs ever added
        self._rows: list[int] = []  # pending pairs, once each: (item, partner)
        self._cols: list[int] = []
        # (m, 2) int32 chunks of the pairs merged since the journal was last cleared; None: not kept.
        self.journal: list[np.ndarray] | None = [] if journal else None

    @property
    def size(self) -> int:
        return len(self.n)

    @property
    def matrix(self) -> np.ndarray | sparse.csr_matrix:
        """The merged counts (pairs still pending are not in it: `flush` first)."""
        if self.dense is not None:
            return self.dense
        if self.csr is not None:
            return self.csr
        return np.zeros((0, 0), dtype=np.float32)

    def inverse_sqrt_users(self) -> np.ndarray:
        """1 / sqrt(n_i), 0 for items nobody had: the cosine's normalisation."""
        inv = np.zeros_like(self.n)
        np.divide(1.0, np.sqrt(self.n), out=inv, where=self.n > 0)
        return inv

    def grow(self, size: int) -> None:
        """Room for `size` items (rows and columns of zeros); dense turns CSR past `dense_max`."""
        if size <= self.size:
            return
        self.n = np.concatenate([self.n, np.zeros(size - self.size)])
        self.flush()
        if size <= self.dense_max:
            old = self.dense if self.dense is not None else np.zeros((0, 0), dtype=np.float32)
            self.dense = np.zeros((size, size), dtype=np.float32)
            self.dense[: old.shape[0], : old.shape[1]] = old
            return
        base = self.csr if self.csr is not None else sparse.csr_matrix((0, 0), dtype=np.float32)
        if self.dense is not None:
            base = sparse.csr_matrix(self.dense)
            self.dense = None
        base = base.tocoo()
        self.csr = sparse.csr_matrix((base.data, (base.row, base.col)), shape=(size, size), dtype=np.float32)

    def add(self, item: int, partners: list[int]) -> None:
        """A user's first event with `item`, which pairs it with each of `partners` once."""
        self.n[item] += 1
        if partners:
            k = len(partners)
            self._rows += [item] * k
            self._cols += partners
            self.pairs += k

    def add_counts(self, rows: np.ndarray, cols: np.ndarray, counts: np.ndarray) -> None:
        """Add `counts` at (rows, cols) and (cols, rows) at once: counts restored from a
        checkpoint, or many pairs. Rows and columns must be within `size`."""
        self.flush()
        if len(rows) == 0:
            return
        r = np.concatenate([rows, cols]).astype(np.int64)
        c = np.concatenate([cols, rows]).astype(np.int64)
        w = np.concatenate([counts, counts]).astype(np.float32)
        if self.dense is not None:
            np.add.at(self.dense, (r, c), w)
        elif self.csr is not None:
            self.csr = (self.csr + sparse.csr_matrix((w, (r, c)), shape=self.csr.shape)).tocsr()
        self.pairs += round(float(counts.sum()))

    def distinct_pairs(self) -> int:
        """How many unordered pairs have a count (merging the pending ones first): no item pairs
        with itself, so half the symmetric matrix's non-zeros."""
        self.flush()
        if self.dense is not None:
            return int(np.count_nonzero(self.dense)) // 2
        return 0 if self.csr is None else int(self.csr.nnz) // 2

    def upper(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The merged counts' upper triangle as (rows, cols, counts): all of a symmetric matrix."""
        self.flush()
        m = sparse.triu(sparse.csr_matrix(self.matrix), k=1).tocoo()
        return m.row.astype(np.int32), m.col.astype(np.int32), m.data.astype(np.float32)

    def pending(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of the pairs not merged yet, both directions."""
        r, c = np.asarray(self._rows, dtype=np.int64), np.asarray(self._cols, dtype=np.int64)
        return np.concatenate([r, c]), np.concatenate([c, r])

    def journal_pairs(self) -> np.ndarray:
        """(m, 2) int32: every pair (item, partner) added since the journal was cleared, merged
        or pending, in the order they came; the journal becomes this one array."""
        assert self.journal is not None, "counts kept without a journal"
        pending = np.stack([np.asarray(self._rows), np.asarray(self._cols)], 1).astype(np.int32)
        merged = np.concatenate([np.zeros((0, 2), dtype=np.int32), *self.journal])
        self.journal = [merged]
        return np.concatenate([merged, pending.reshape(-1, 2)])

    def flush(self, force: bool = True) -> None:
        """Merge the pending pairs; CSR counts only when `force` or the buffer outgrew them."""
        if not self._rows or (self.dense is None and self.csr is None):
            return
        if self.csr is not None and not force and 2 * len(self._rows) <= max(self.csr.nnz, 1 << 20):
            return
        r, c = self.pending()
        if self.journal is not None:
            self.journal.append(np.stack([r[: len(self._rows)], c[: len(self._rows)]], 1).astype(np.int32))
        self._rows, self._cols = [], []
        if self.dense is not None:
            flat, counts = np.unique(r * self.dense.shape[1] + c, return_counts=True)
            self.dense.ravel()[flat] += counts
        elif self.csr is not None:
            shape = self.csr.shape  # during `grow`, the items' old number
            add = sparse.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=shape)
            self.csr = (self.csr + add).tocsr()
