"""What the consumer hands the processor, and what comes back: records, outcomes, dead letters.

Kept apart from `stream.processor` (which imports the model and torch) so that clients such
as the producer and the metrics module load in a fraction of a second.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


@dataclass(slots=True)
class BatchOutcome:
    applied: int = 0
    duplicates: int = 0
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    users: int = 0
    items: int = 0
    seconds: float = 0.0
    loss: float | None = None
    max_event_ts: float | None = None
    erased: int = 0  # events of erased users, dropped by the erasure rule
    model_version: str | None = None
    committed_at: float = 0.0  # wall clock, epoch seconds
    event_ts: list[float] = field(default_factory=list)  # event times of the applied events
    record_ts: list[float] = field(default_factory=list)  # broker timestamps of the applied events
    dp_epsilon: float | None = None  # DP: ε spent so far by the model (docs/privacy.md)
    dp_exhausted: bool = False  # DP: the budget is spent and shared parameters are frozen

    def merge(self, other: BatchOutcome) -> BatchOutcome:
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.dead_letters.extend(other.dead_letters)
        self.users += other.users
        self.items += other.items
        self.seconds += other.seconds
        self.loss = other.loss if other.loss is not None else self.loss
        self.max_event_ts = max(
            (t for t in (self.max_event_ts, other.max_event_ts) if t is not None), default=None
        )
        self.model_version = other.model_version or self.model_version
        self.committed_at = max(self.committed_at, other.committed_at)
        self.event_ts.extend(other.event_ts)
        self.record_ts.extend(other.record_ts)
        self.erased += other.erased
        self.dp_epsilon = other.dp_epsilon if other.dp_epsilon is not None else self.dp_epsilon
        self.dp_exhausted = self.dp_exhausted or other.dp_exhausted
        return self


def dead_letter(record: RawRecord, reason: str) -> dict[str, Any]:
    """The dead-letter value: the original bytes (base64 and, when text, as text), where, and why."""
    value = record.value or b""
    try:
        text_value: str | None = value.decode("utf-8")
    except UnicodeDecodeError:
        text_value = None
    return {
        "reason": reason,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": record.key.decode("utf-8", "replace") if record.key else None,
        "value_b64": base64.b64encode(value).decode("ascii"),
        "value_text": text_value,
        "failed_at_ms": int(time.time() * 1000),
    }


def encode_dead_letter(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, ensure_ascii=False).encode("utf-8")
