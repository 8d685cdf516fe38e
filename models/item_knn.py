"""`item_knn`: item-item co-occurrence learned online, the classic neighbourhood baseline.

Two items co-occur when one user interacts with both within `window` distinct items of each
other. Similarity is the cosine of those co-occurrences: `C[i, j] / sqrt(n_i * n_j)`, with `n_i`
the users who interacted with `i`. A user's score for item `j` sums the similarity of `j` to
each of the user's `window` most recent items, the r-th most recent weighted `decay ** r`. Items
with no co-occurrence at all are ordered by a negligible popularity term (tie-break only).

It holds no vector space: `predict_many` scores users directly, and `user_vector` is None. The
counts are `models.pair_counts.PairCounts` (dense up to `DENSE_MAX_ITEMS` items, CSR beyond),
the same the fine-tuned models' co-occurrence factors count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import sparse

from models.baselines import _IdCatalog, _touched
from models.catalog import TextEncoder
from models.core import BatchResult, InterestModel, UserUpdate
from models.events import Event, Item
from models.pair_counts import DENSE_MAX_ITEMS, PairCounts
from models.registry import register

_TIE_BREAK = 1e-6  # popularity only orders items that no neighbour reaches


class ItemKNNModel(InterestModel):
    name = "item_knn"

    def __init__(
        self,
        encoder: TextEncoder | None = None,
        *,
        arg: str | None = None,
        window: int = 50,
        decay: float = 0.9,
        **_other_options: Any,  # options the runtime passes to every strategy; none apply here
    ) -> None:
        try:
            self.window = int(arg) if arg else int(window)
        except ValueError:
            raise ValueError(f"item_knn:<window> expected, got item_knn:{arg}") from None
        if self.window < 1:
            raise ValueError(f"item_knn window must be >= 1, got {self.window}")
        if not 0 < decay <= 1:
            raise ValueError(f"item_knn decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.catalog = _IdCatalog()
        self.counts = PairCounts(DENSE_MAX_ITEMS)
        self.recent: dict[str, list[int]] = {}  # user -> recent distinct items, newest last
        self.had: dict[str, set[int]] = {}
        self.users: dict[str, int] = {}
        self._batches = 0

    @property
    def model_version(self) -> str:
        return f"item_knn-w{self.window}@{self._batches}"

    @property
    def dim(self) -> int:
        return 0

    @property
    def n(self) -> np.ndarray:
        """Users per item."""
        return self.counts.n

    @property
    def dense(self) -> np.ndarray | None:
        return self.counts.dense

    @property
    def csr(self) -> sparse.csr_matrix | None:
        return self.counts.csr

    def config(self) -> dict[str, Any]:
        return {"model": self.name, "window": self.window, "decay": self.decay}

    def upsert_items(self, items: Sequence[Item]) -> None:
        if not self.catalog.upsert(items):
            return
        self.counts.grow(len(self.catalog.ids))

    def item_ids(self) -> Sequence[str]:
        return self.catalog.ids

    def item_matrix(self) -> np.ndarray:
        return np.zeros((len(self.catalog.ids), 0), dtype=np.float32)

    def user_vector(self, user_id: str) -> np.ndarray | None:
        return None  # scores come from the neighbourhood, not a vector space

    def learn(self, events: Sequence[Event]) -> BatchResult:
        for e in events:
            self.users[e.user_id] = self.users.get(e.user_id, 0) + 1
            target = e.target_item
            item = self.catalog.index.get(target) if target is not None else None
            if item is None:
                continue
            recent = self.recent.setdefault(e.user_id, [])
            had = self.had.setdefault(e.user_id, set())
            if item in had:
                # A repeat adds no co-occurrence but makes the item recent again.
                if item in recent:
                    recent.remove(item)
                recent.append(item)
            else:
                had.add(item)
                self.counts.add(item, list(recent))
                recent.append(item)
            if len(recent) > self.window:
                del recent[0]
        if self.dense is not None:
            self._flush()
        if events:
            self._batches += 1
        updates = {
            u: UserUpdate(user_id=u, vector=np.zeros(0, dtype=np.float32), n_applied=n, last_event_ts=ts)
            for u, (n, ts) in _touched(events).items()
        }
        return BatchResult(updates=updates, model_version=self.model_version)

    def _flush(self, force: bool = True) -> None:
        self.counts.flush(force)

    def _weights(self, user_ids: Sequence[str]) -> tuple[sparse.csr_matrix, np.ndarray]:
        """(users x items) recency weights over each user's recent items, divided by sqrt(n_i)."""
        indptr = [0]
        indices: list[int] = []
        data: list[float] = []
        known = np.zeros(len(user_ids), dtype=bool)
        for row, u in enumerate(user_ids):
            recent = self.recent.get(u, [])
            k = len(recent)
            indices += recent
            data += [self.decay ** (k - 1 - r) for r in range(k)]
            indptr.append(len(indices))
            known[row] = k > 0
        w = sparse.csr_matrix(
            (np.asarray(data, dtype=np.float32), np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
            shape=(len(user_ids), len(self.catalog.ids)),
        )
        inv = self.counts.inverse_sqrt_users()
        return (w @ sparse.diags(inv.astype(np.float32))).tocsr(), inv

    def predict_many(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        size = len(self.catalog.ids)
        if not user_ids or size == 0:
            return np.zeros((len(user_ids), size)), np.zeros(len(user_ids), dtype=bool)
        w, inv = self._weights(user_ids)
        if self.dense is not None:
            scores = np.asarray(w @ self.dense, dtype=np.float64)  # float32 product, then widened
        else:
            assert self.csr is not None
            self._flush(force=False)
            scores = (w @ self.csr).toarray()
            r, c = self.counts.pending()
            if len(r):
                # New pairs not merged yet: only those from the users' recent items matter.
                keep = np.isin(r, w.indices)
                part = sparse.csr_matrix(
                    (np.ones(int(keep.sum()), dtype=np.float32), (r[keep], c[keep])), shape=(size, size)
                )
                scores += (w @ part).toarray()
        scores *= inv[None, :]
        pop = np.log1p(self.n)
        top = pop.max()
        if top > 0:
            scores += _TIE_BREAK * pop[None, :] / top
        return scores, np.ones(len(user_ids), dtype=bool)

    def predict(self, user_id: str) -> np.ndarray | None:
        return self.predict_many([user_id])[0][0]

    def get_user_state(self, user_id: str) -> dict[str, Any] | None:
        if user_id not in self.users:
            return None
        ids = self.catalog.ids
        return {
            "recent": [ids[i] for i in self.recent.get(user_id, [])],
            "had": sorted(ids[i] for i in self.had.get(user_id, set())),
            "n_events": self.users[user_id],
        }

    def set_user_state(self, user_id: str, state: Mapping[str, Any]) -> None:
        index = self.catalog.index
        self.recent[user_id] = [index[i] for i in state.get("recent", []) if i in index]
        self.had[user_id] = {index[i] for i in state.get("had", []) if i in index}
        self.users[user_id] = int(state.get("n_events", 0))

    def forget_user(self, user_id: str) -> None:
        # Co-occurrence counts are aggregates over everyone; the user's own history goes.
        for store in (self.recent, self.had, self.users):
            store.pop(user_id, None)

    def known_users(self) -> Sequence[str]:
        return list(self.users)


register("item_knn", ItemKNNModel)
