"""Validated event and catalog records as the core sees them.

The wire format (JSON on Kafka or in JSONL logs) is parsed and validated in
`stream.schema`; by the time a record reaches `models/` it is one of these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

EventKind = Literal["click", "search", "rating"]
EVENT_KINDS: tuple[EventKind, ...] = ("click", "search", "rating")


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    user_id: str
    ts: float  # event time, seconds since the Unix epoch (UTC)
    kind: EventKind
    item_id: str | None = None
    impressions: tuple[str, ...] = ()
    dwell_ms: int | None = None
    query: str | None = None
    clicked_item_id: str | None = None
    rating: float | None = None

    @property
    def target_item(self) -> str | None:
        """The item this event is about: the clicked/rated item, or the item a search led to."""
        return self.item_id if self.kind != "search" else self.clicked_item_id


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    text: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    # A precomputed vector from another modality (image, audio, ...), fused with the text.
    embedding: tuple[float, ...] | None = None


@dataclass(frozen=True, slots=True)
class UserProfile:
    """Optional side information for cold start (e.g. MovieLens age/gender/occupation)."""

    user_id: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
