"""Baselines behind the same `InterestModel` interface, so the backtest drives them like any strategy.

- `PopularityModel`: time-decayed interaction counts per item; every user gets the
  same ranking (minus what they have seen). Its "user vector" is the constant 1
  against a one-column item matrix of decayed counts, so it can also be stored.
- `BiasedMFModel`: river's `reco.BiasedMF` learned online from ratings (clicks
  and searches that led to a click count as an implicit rating). Its vectors are
  exact: user `[1, b_u, p_u]` against item `[mu + b_i, 1, q_i]` gives
  `mu + b_u + b_i + <p_u, q_i>`, river's own prediction.

Neither needs the text encoder; both take it so the registry can build every
model the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from river import optim, reco

from models.catalog import TextEncoder
from models.core import BatchResult, InterestModel, UserUpdate
from models.events import Event, Item
from models.registry import register

DAY_S = 86400.0


class _IdCatalog:
    """Item ids in arrival order; these baselines never look at item text."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}

    def upsert(self, items: Sequence[Item]) -> bool:
        grew = False
        for item in items:
            if item.item_id not in self.index:
                self.index[item.item_id] = len(self.ids)
                self.ids.append(item.item_id)
                grew = True
        return grew


def _touched(events: Sequence[Event]) -> dict[str, tuple[int, float]]:
    out: dict[str, tuple[int, float]] = {}
    for e in events:
        n, ts = out.get(e.user_id, (0, e.ts))
        out[e.user_id] = (n + 1, max(ts, e.ts))
    return out


class PopularityModel(InterestModel):
    """Items ranked by exponentially time-decayed interaction counts (half-life in event time)."""

    name = "popularity"

    def __init__(
        self,
        encoder: TextEncoder | None = None,
        *,
        half_life_days: float = 30.0,
        arg: str | None = None,
        # Options the runtime passes to every strategy. ISTREAM_HALF_LIFE_S is how fast a *user's*
        # interest fades; catalog popularity moves on a slower clock, so it has its own.
        **_other_options: Any,
    ) -> None:
        try:
            days = float(arg) if arg else float(half_life_days)
        except ValueError:
            raise ValueError(f"popularity:<half-life days> expected, got popularity:{arg}") from None
        if not days > 0:
            raise ValueError(f"popularity half-life must be > 0 days, got {days:g}")
        self.half_life_s = days * DAY_S
        self.catalog = _IdCatalog()
        self.counts = np.zeros(0, dtype=np.float64)
        self.now: float | None = None  # counts are expressed as of this event time
        self.users: dict[str, int] = {}
        self._batches = 0

    @property
    def model_version(self) -> str:
        # The item column changes with every batch, and a user vector is scored against its version.
        return f"popularity-hl{self.half_life_s / DAY_S:g}d@{self._batches}"

    @property
    def dim(self) -> int:
        return 1

    def config(self) -> dict[str, Any]:
        return {"model": self.name, "half_life_s": self.half_life_s}

    def upsert_items(self, items: Sequence[Item]) -> None:
        if self.catalog.upsert(items):
            self.counts = np.concatenate([self.counts, np.zeros(len(self.catalog.ids) - len(self.counts))])

    def item_ids(self) -> Sequence[str]:
        return self.catalog.ids

    def item_matrix(self) -> np.ndarray:
        # log1p keeps the vectors in a sane range; the order is what matters.
        return np.log1p(self.counts).astype(np.float32)[:, None]

    def user_vector(self, user_id: str) -> np.ndarray | None:
        return np.ones(1, dtype=np.float32)  # the popularity prior serves every user, known or not

    def predict_many(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        row = self.counts[None, :]
        return np.repeat(row, len(user_ids), axis=0), np.ones(len(user_ids), dtype=bool)

    def learn(self, events: Sequence[Event]) -> BatchResult:
        if events:
            end = max(e.ts for e in events)
            if self.now is not None and end > self.now:
                self.counts *= math.pow(0.5, (end - self.now) / self.half_life_s)
            self.now = end if self.now is None else max(self.now, end)
            for e in events:
                row = self.catalog.index.get(e.target_item) if e.target_item else None
                if row is not None:
                    self.counts[row] += math.pow(0.5, (self.now - e.ts) / self.half_life_s)
                self.users[e.user_id] = self.users.get(e.user_id, 0) + 1
            self._batches += 1
        one = np.ones(1, dtype=np.float32)
        updates = {
            u: UserUpdate(user_id=u, vector=one, n_applied=n, last_event_ts=ts)
            for u, (n, ts) in _touched(events).items()
        }
        return BatchResult(updates=updates, model_version=self.model_version)

    def get_user_state(self, user_id: str) -> dict[str, Any] | None:
        n = self.users.get(user_id)
        return None if n is None else {"n_events": n}

    def set_user_state(self, user_id: str, state: Mapping[str, Any]) -> None:
        self.users[user_id] = int(state["n_events"])

    def forget_user(self, user_id: str) -> None:
        # Counts are aggregates over everyone; a user's share is not separable and not personal.
        self.users.pop(user_id, None)

    def known_users(self) -> Sequence[str]:
        return list(self.users)


class BiasedMFModel(InterestModel):
    """river's online biased matrix factorisation, scored over the whole catalog at once."""

    name = "biased_mf"

    def __init__(
        self,
        encoder: TextEncoder | None = None,
        *,
        arg: str | None = None,
        n_factors: int = 10,
        learning_rate: float = 0.01,
        l2: float = 0.0,
        implicit_rating: float = 4.0,
        seed: int = 0,
        **_other_options: Any,  # options the runtime passes to every strategy; none apply here
    ) -> None:
        try:
            self.n_factors = int(arg) if arg else n_factors
        except ValueError:
            raise ValueError(f"biased_mf:<factors> expected, got biased_mf:{arg}") from None
        if self.n_factors < 1:
            raise ValueError(f"biased_mf needs at least 1 factor, got {self.n_factors}")
        self.learning_rate = learning_rate
        self.l2 = l2
        self.implicit_rating = implicit_rating
        self.seed = seed
        self.mf = reco.BiasedMF(
            n_factors=self.n_factors,
            bias_optimizer=optim.SGD(learning_rate),
            latent_optimizer=optim.SGD(learning_rate),
            l2_bias=l2,
            l2_latent=l2,
            latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed),
            seed=seed,
        )
        self.catalog = _IdCatalog()
        self.users: dict[str, int] = {}
        self._items_cache: np.ndarray | None = None
        self._batches = 0

    @property
    def model_version(self) -> str:
        return f"biased_mf-k{self.n_factors}-s{self.seed}@{self._batches}"

    @property
    def dim(self) -> int:
        return self.n_factors + 2

    def config(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "n_factors": self.n_factors,
            "learning_rate": self.learning_rate,
            "l2": self.l2,
            "implicit_rating": self.implicit_rating,
            "seed": self.seed,
        }

    def upsert_items(self, items: Sequence[Item]) -> None:
        if self.catalog.upsert(items):
            self._items_cache = None

    def item_ids(self) -> Sequence[str]:
        return self.catalog.ids

    def _item_row(self, item: str) -> np.ndarray:
        """[b_i, 1, q_i]; items river has not met yet: zero factors and bias (reading river's
        defaultdicts would invent random ones as a side effect)."""
        row = np.zeros(self.dim, dtype=np.float64)
        row[1] = 1.0
        if item in self.mf.i_latents:
            row[0] = self.mf.i_biases.get(item, 0.0)
            row[2:] = self.mf.i_latents[item]
        return row

    def item_matrix(self) -> np.ndarray:
        if self._items_cache is None or len(self._items_cache) != len(self.catalog.ids):
            self._items_cache = (
                np.stack([self._item_row(i) for i in self.catalog.ids])
                if self.catalog.ids
                else (np.zeros((0, self.dim)))
            )
        out = self._items_cache.copy()
        out[:, 0] += self.mf.global_mean.get()  # mu moves with every rating, so it is added last
        return out

    def user_vector(self, user_id: str) -> np.ndarray | None:
        if user_id not in self.mf.u_latents:
            return None
        vec = np.empty(self.dim, dtype=np.float64)
        vec[0] = 1.0
        vec[1] = self.mf.u_biases.get(user_id, 0.0)
        vec[2:] = self.mf.u_latents[user_id]
        return vec

    def _score_vector(self, user_id: str) -> np.ndarray:
        # An unknown user has zero bias and (river draws random ones) negligible factors:
        # river's own prediction for them is mu + b_i, so rank by that.
        vec = self.user_vector(user_id)
        if vec is None:
            vec = np.zeros(self.dim)
            vec[0] = 1.0
        return vec

    def predict(self, user_id: str) -> np.ndarray | None:
        return self.item_matrix() @ self._score_vector(user_id)

    def predict_many(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        users = np.stack([self._score_vector(u) for u in user_ids]) if user_ids else np.zeros((0, self.dim))
        return users @ self.item_matrix().T, np.ones(len(user_ids), dtype=bool)

    def predict_rating(self, user_id: str, item_id: str) -> float | None:
        if user_id not in self.mf.u_latents or item_id not in self.mf.i_latents:
            return None
        return float(self.mf.predict_one(user_id, item_id))

    def _target(self, e: Event) -> tuple[str, float] | None:
        if e.kind == "rating" and e.item_id is not None and e.rating is not None:
            return e.item_id, e.rating
        item = e.target_item
        return (item, self.implicit_rating) if item is not None else None

    def learn(self, events: Sequence[Event]) -> BatchResult:
        touched: set[str] = set()
        for e in events:
            target = self._target(e)
            if target is not None:
                self.mf.learn_one(e.user_id, target[0], target[1])
                touched.add(target[0])
            self.users[e.user_id] = self.users.get(e.user_id, 0) + 1
        if events:
            self._batches += 1
        if self._items_cache is not None:
            # Only the items of this batch changed (besides mu): refresh their rows alone.
            for item in touched:
                row = self.catalog.index.get(item)
                if row is not None and row < len(self._items_cache):
                    self._items_cache[row] = self._item_row(item)
        updates = {}
        for u, (n, ts) in _touched(events).items():
            vec = self.user_vector(u)
            vec = vec if vec is not None else np.zeros(self.dim)
            updates[u] = UserUpdate(user_id=u, vector=vec.astype(np.float32), n_applied=n, last_event_ts=ts)
        return BatchResult(updates=updates, model_version=self.model_version)

    def get_user_state(self, user_id: str) -> dict[str, Any] | None:
        if user_id not in self.mf.u_latents:
            return None
        return {
            "bias": float(self.mf.u_biases.get(user_id, 0.0)),
            "latent": [float(v) for v in self.mf.u_latents[user_id]],
            "n_events": self.users.get(user_id, 0),
        }

    def set_user_state(self, user_id: str, state: Mapping[str, Any]) -> None:
        self.mf.u_biases[user_id] = float(state["bias"])
        self.mf.u_latents[user_id] = np.asarray(state["latent"], dtype=np.float64)
        self.users[user_id] = int(state.get("n_events", 0))

    def forget_user(self, user_id: str) -> None:
        self.mf.u_biases.pop(user_id, None)
        self.mf.u_latents.pop(user_id, None)
        self.users.pop(user_id, None)

    def known_users(self) -> Sequence[str]:
        return list(self.users)


register("popularity", PopularityModel)
register("biased_mf", BiasedMFModel)
