"""Per-user interest state: recent behaviours (for attention) and a slow long-term average.

Kept small and JSON-serialisable (item ids and query texts, never catalog row
numbers), so a worker can checkpoint it and a restarted worker can restore it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.core import pack_vector, unpack_vector

# Signal ids: what kind of behaviour an entry was (0 is padding).
SIGNAL_CLICK = 1
SIGNAL_SEARCH = 2
SIGNAL_RATING0 = 3  # ratings take SIGNAL_RATING0 .. SIGNAL_RATING0 + RATING_BUCKETS - 1
RATING_BUCKETS = 10
N_SIGNALS = SIGNAL_RATING0 + RATING_BUCKETS
N_AGE_BUCKETS = 16


def rating_signal(rating: float, rating_min: float, rating_max: float) -> int:
    span = max(rating_max - rating_min, 1e-9)
    frac = min(max((rating - rating_min) / span, 0.0), 1.0)
    return SIGNAL_RATING0 + min(RATING_BUCKETS - 1, int(frac * RATING_BUCKETS))


def age_bucket(age_s: float) -> int:
    """Log-scale recency buckets: minutes, hours, days, months apart land in different buckets."""
    return min(N_AGE_BUCKETS - 1, int(math.log2(1.0 + max(age_s, 0.0) / 60.0)))


@dataclass(frozen=True, slots=True)
class Behaviour:
    signal: int
    ts: float
    item_id: str | None = None
    query: str | None = None
    event_id: str | None = None

    def to_json(self) -> list[Any]:
        return [self.signal, self.ts, self.item_id, self.query, self.event_id]

    @staticmethod
    def from_json(raw: list[Any]) -> Behaviour:
        return Behaviour(int(raw[0]), float(raw[1]), raw[2], raw[3], raw[4] if len(raw) > 4 else None)


@dataclass(slots=True)
class UserState:
    history_len: int
    recent: deque[Behaviour] = field(default_factory=deque)
    long_term: np.ndarray | None = None  # slow moving average of the user's item vectors
    n_events: int = 0
    last_ts: float = 0.0
    cold_start: str | None = None
    seen: set[str] = field(default_factory=set)  # items interacted with (excluded as training negatives)

    def __post_init__(self) -> None:
        self.recent = deque(self.recent, maxlen=self.history_len)

    def push(self, b: Behaviour) -> None:
        self.recent.append(b)
        self.last_ts = max(self.last_ts, b.ts)
        if b.item_id is not None:
            self.seen.add(b.item_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "recent": [b.to_json() for b in self.recent],
            "long_term": None if self.long_term is None else pack_vector(self.long_term),
            "n_events": self.n_events,
            "last_ts": self.last_ts,
            "cold_start": self.cold_start,
            "seen": sorted(self.seen),
        }

    @staticmethod
    def from_json(raw: Mapping[str, Any], history_len: int) -> UserState:
        lt = raw.get("long_term")
        return UserState(
            history_len=history_len,
            recent=deque((Behaviour.from_json(b) for b in raw.get("recent", [])), maxlen=history_len),
            long_term=None if lt is None else unpack_vector(lt),
            n_events=int(raw.get("n_events", 0)),
            last_ts=float(raw.get("last_ts", 0.0)),
            cold_start=raw.get("cold_start"),
            seen=set(raw.get("seen", [])),
        )
