"""A bounded buffer of recent training examples, replayed a few at a time against forgetting."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class ReplayBuffer(Generic[T]):
    """Keeps the newest `capacity` examples; `sample` draws uniformly without replacement."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self._items: deque[T] = deque(maxlen=max(capacity, 1))
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self._items) if self.capacity > 0 else 0

    def extend(self, items: Iterable[T]) -> None:
        if self.capacity > 0:
            self._items.extend(items)

    def sample(self, n: int) -> list[T]:
        if self.capacity <= 0 or n <= 0 or not self._items:
            return []
        n = min(n, len(self._items))
        return [self._items[i] for i in self._rng.sample(range(len(self._items)), n)]

    def clear(self) -> None:
        self._items.clear()
