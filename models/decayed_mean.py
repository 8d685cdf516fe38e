"""The untrained baseline: a user's vector is the time-decayed mean of base encodings.

No parameters are learned; it is what the base model knows about item and
query text, weighted by recency. It implements the same interface as the
fine-tuning models, so it is also the cheapest production model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.catalog import Catalog, TextEncoder
from models.core import BatchResult, InterestModel, UserUpdate, pack_vector, unpack_vector
from models.events import Event, Item


@dataclass(slots=True)
class DecayedState:
    total: np.ndarray
    weight: float = 0.0
    last_ts: float = 0.0
    n_events: int = 0


class DecayedMeanModel(InterestModel):
    name = "decayed_mean"

    def __init__(
        self,
        encoder: TextEncoder,
        *,
        half_life_s: float = 3 * 86400.0,
        rating_max: float = 5.0,
        click_weight: float = 1.0,
        search_weight: float = 1.0,
    ) -> None:
        self.encoder = encoder
        self.catalog = Catalog(encoder)
        self.half_life_s = half_life_s
        self.rating_max = rating_max
        self.click_weight = click_weight
        self.search_weight = search_weight
        self.users: dict[str, DecayedState] = {}

    @property
    def model_version(self) -> str:
        return f"decayed_mean@{self.encoder.version}"

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def config(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "base": self.encoder.version,
            "half_life_s": self.half_life_s,
            "rating_max": self.rating_max,
        }

    def upsert_items(self, items: Sequence[Item]) -> None:
        self.catalog.upsert(items)

    def item_ids(self) -> Sequence[str]:
        return self.catalog.ids

    def item_matrix(self) -> np.ndarray:
        return self.catalog.encodings

    def user_vector(self, user_id: str) -> np.ndarray | None:
        state = self.users.get(user_id)
        if state is None or state.weight <= 0:
            return None
        vec = state.total / state.weight
        norm = float(np.linalg.norm(vec))
        return vec / norm if norm > 0 else vec

    def _contributions(self, event: Event) -> list[tuple[np.ndarray, float]]:
        out: list[tuple[np.ndarray, float]] = []
        if event.kind == "search" and event.query:
            out.append((self.encoder.encode([event.query])[0], self.search_weight))
        row = self.catalog.row(event.target_item)
        if row is not None:
            if event.kind == "rating" and event.rating is not None:
                weight = max(event.rating, 0.0) / self.rating_max
            else:
                weight = self.click_weight
            out.append((self.catalog.encodings[row], weight))
        return out

    def learn(self, events: Sequence[Event]) -> BatchResult:
        touched: dict[str, int] = {}
        for event in events:
            state = self.users.get(event.user_id)
            if state is None:
                state = self.users[event.user_id] = DecayedState(
                    total=np.zeros(self.dim, dtype=np.float32), last_ts=event.ts
                )
            if event.ts > state.last_ts:
                decay = math.pow(0.5, (event.ts - state.last_ts) / self.half_life_s)
                state.total *= decay
                state.weight *= decay
                state.last_ts = event.ts
            for vec, weight in self._contributions(event):
                state.total += weight * vec
                state.weight += weight
            state.n_events += 1
            touched[event.user_id] = touched.get(event.user_id, 0) + 1
        updates: dict[str, UserUpdate] = {}
        for user_id, n in touched.items():
            state = self.users[user_id]
            vec = self.user_vector(user_id)
            updates[user_id] = UserUpdate(
                user_id=user_id,
                vector=vec if vec is not None else np.zeros(self.dim, dtype=np.float32),
                n_applied=n,
                last_event_ts=state.last_ts,
            )
        return BatchResult(updates=updates, model_version=self.model_version)

    def get_user_state(self, user_id: str) -> dict[str, Any] | None:
        s = self.users.get(user_id)
        if s is None:
            return None
        return {
            "total": pack_vector(s.total),
            "weight": s.weight,
            "last_ts": s.last_ts,
            "n_events": s.n_events,
        }

    def set_user_state(self, user_id: str, state: Mapping[str, Any]) -> None:
        self.users[user_id] = DecayedState(
            total=unpack_vector(state["total"]),
            weight=float(state["weight"]),
            last_ts=float(state["last_ts"]),
            n_events=int(state["n_events"]),
        )

    def forget_user(self, user_id: str) -> None:
        self.users.pop(user_id, None)

    def known_users(self) -> Sequence[str]:
        return list(self.users)
