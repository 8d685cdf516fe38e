"""Per-user interest state: recent behaviours (for attention) and a slow long-term average.

Kept small and JSON-serialisable (item ids and query texts, never catalog row
numbers), so a worker can checkpoint it and a restarted worker can restore it.
"""

from __future__ import annotations

import base64
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
        """A compact, columnar JSON checkpoint (written for every user of every batch).

        Signals and times are packed arrays, searches are sparse, and `seen` leaves out the
        recent items it always contains: a synthetic user with 60 events went from 3.6 KB
        and 53 us (encode + json.dumps) to 2.8 KB and 38 us; the batch's commit from 75 to
        43 us per event (2,000-event batches over 4 partitions).
        """
        recent = self.recent
        items = [b.item_id for b in recent]
        in_recent = {i for i in items if i is not None}
        out: dict[str, Any] = {
            "v": 2,
            "signal": _pack(np.fromiter((b.signal for b in recent), np.uint8, len(recent))),
            "ts": _pack(np.fromiter((b.ts for b in recent), "<f8", len(recent))),
            "item": items,
            "event": [b.event_id for b in recent],
            "long_term": None if self.long_term is None else pack_vector(self.long_term),
            "n_events": self.n_events,
            "last_ts": self.last_ts,
            "cold_start": self.cold_start,
            "seen_before": sorted(self.seen - in_recent),
        }
        queries = {str(k): b.query for k, b in enumerate(recent) if b.query is not None}
        if queries:
            out["query"] = queries  # position -> search text (few behaviours are searches)
        return out

    @staticmethod
    def from_json(raw: Mapping[str, Any], history_len: int) -> UserState:
        lt = raw.get("long_term")
        if raw.get("v") == 2:
            signals = _unpack(raw["signal"], np.uint8)
            times = _unpack(raw["ts"], "<f8")
            by_pos = raw.get("query") or {}
            queries = [by_pos.get(str(k)) for k in range(len(signals))]
            recent = [
                Behaviour(int(sig), float(t), item, query, event)
                for sig, t, item, query, event in zip(
                    signals, times, raw["item"], queries, raw["event"], strict=True
                )
            ]
            seen = set(raw.get("seen_before", [])) | {b.item_id for b in recent if b.item_id is not None}
        else:  # the first layout: a list per behaviour, and every seen item
            recent = [Behaviour.from_json(b) for b in raw.get("recent", [])]
            seen = set(raw.get("seen", []))
        return UserState(
            history_len=history_len,
            recent=deque(recent, maxlen=history_len),
            long_term=None if lt is None else unpack_vector(lt),
            n_events=int(raw.get("n_events", 0)),
            last_ts=float(raw.get("last_ts", 0.0)),
            cold_start=raw.get("cold_start"),
            seen=seen,
        )


def _pack(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values).tobytes()).decode("ascii")


def _unpack(raw: str, dtype: Any) -> np.ndarray:
    return np.frombuffer(base64.b64decode(raw), dtype=dtype)
