"""Model wrappers for what-if backtests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.core import BatchResult, InterestModel
from models.events import Event, Item, UserProfile


class FrozenAfter(InterestModel):
    """A model whose updates stop at an event time: what production would do if training halted.

    Events at or after `frozen_at` (epoch seconds) are never learned; the model
    keeps serving the state it had. The backtest uses it to show that tracking
    interests needs the updates.
    """

    def __init__(self, inner: InterestModel, frozen_at: float) -> None:
        self.inner = inner
        self.frozen_at = frozen_at
        self.name = f"{inner.name}-frozen"

    @property
    def model_version(self) -> str:
        return self.inner.model_version

    @property
    def dim(self) -> int:
        return self.inner.dim

    def config(self) -> dict[str, Any]:
        return {**self.inner.config(), "frozen_at": self.frozen_at}

    def upsert_items(self, items: Sequence[Item]) -> None:
        self.inner.upsert_items(items)

    def set_profiles(self, profiles: Sequence[UserProfile]) -> None:
        self.inner.set_profiles(profiles)

    def item_ids(self) -> Sequence[str]:
        return self.inner.item_ids()

    def item_matrix(self) -> np.ndarray:
        return self.inner.item_matrix()

    def user_vector(self, user_id: str) -> np.ndarray | None:
        return self.inner.user_vector(user_id)

    def predict(self, user_id: str) -> np.ndarray | None:
        return self.inner.predict(user_id)

    def predict_many(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        from stream.backtest.driver import score_users

        return score_users(self.inner, user_ids)

    def learn(self, events: Sequence[Event]) -> BatchResult:
        return self.inner.learn([e for e in events if e.ts < self.frozen_at])

    def get_user_state(self, user_id: str) -> dict[str, Any] | None:
        return self.inner.get_user_state(user_id)

    def set_user_state(self, user_id: str, state: Mapping[str, Any]) -> None:
        self.inner.set_user_state(user_id, state)

    def forget_user(self, user_id: str) -> None:
        self.inner.forget_user(user_id)

    def known_users(self) -> Sequence[str]:
        return self.inner.known_users()
