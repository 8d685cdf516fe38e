"""One micro-batch, from raw Kafka records to committed vectors. Broker-agnostic.

The Faust agents stay thin: they hand raw records here. The same object can be
driven by any consumer, which is what the tests do to exercise it directly.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from models.core import InterestModel
from models.events import Event, Item
from storage.repository import OffsetMark, VectorStore
from stream.schema import InvalidRecord, Limits, parse_topic_record

log = logging.getLogger(__name__)


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


def dead_letter(record: RawRecord, reason: str) -> dict[str, Any]:
    """The dead-letter value: the original bytes (base64 and, when text, as text), where, and why."""
    value = record.value or b""
    try:
        text: str | None = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {
        "reason": reason,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": record.key.decode("utf-8", "replace") if record.key else None,
        "value_b64": base64.b64encode(value).decode("ascii"),
        "value_text": text,
        "failed_at_ms": int(time.time() * 1000),
    }


def encode_dead_letter(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, ensure_ascii=False).encode("utf-8")


class BatchProcessor:
    """Validate, deduplicate, learn, and commit one batch in one transaction."""

    def __init__(
        self,
        model: InterestModel,
        store: VectorStore,
        topic_kinds: dict[str, str],
        limits: Limits,
        base_model: str,
    ) -> None:
        self.model = model
        self.store = store
        self.topic_kinds = topic_kinds
        self.limits = limits
        self.base_model = base_model
        self._published: set[str] = set()

    def _parse(
        self, records: Sequence[RawRecord]
    ) -> tuple[list[tuple[RawRecord, Event | Item]], list[dict[str, Any]]]:
        good: list[tuple[RawRecord, Event | Item]] = []
        bad: list[dict[str, Any]] = []
        for rec in records:
            kind = self.topic_kinds.get(rec.topic)
            if kind is None:
                bad.append(dead_letter(rec, f"topic {rec.topic!r} carries no known record type"))
                continue
            if rec.value is None:
                bad.append(dead_letter(rec, "empty record (no value)"))
                continue
            try:
                parsed = parse_topic_record(rec.value, kind, self.limits)
            except InvalidRecord as exc:
                bad.append(dead_letter(rec, exc.reason))
                continue
            good.append((rec, parsed))
        return good, bad

    @staticmethod
    def _offsets(records: Sequence[RawRecord]) -> list[OffsetMark]:
        nxt: dict[tuple[str, int], int] = {}
        for r in records:
            key = (r.topic, r.partition)
            nxt[key] = max(nxt.get(key, 0), r.offset + 1)
        return [OffsetMark(t, p, o) for (t, p), o in sorted(nxt.items())]

    def ensure_published(self) -> None:
        """Register the model version and its item vectors before a user row can name it."""
        version = self.model.model_version
        if version in self._published:
            return
        self.store.publish_model(self.model.snapshot(), self.base_model)
        self._published.add(version)

    def process(self, records: Sequence[RawRecord]) -> BatchOutcome:
        started = time.perf_counter()
        good, bad = self._parse(records)
        outcome = BatchOutcome(dead_letters=bad)
        items = [p for _, p in good if isinstance(p, Item)]
        if items:
            self.apply_items(items)
            outcome.items = len(items)
        events = [p for _, p in good if isinstance(p, Event)]
        # Dedup against what is already applied, and within the batch itself.
        seen = self.store.applied_event_ids([e.event_id for e in events])
        fresh: list[Event] = []
        for e in events:
            if e.event_id in seen:
                outcome.duplicates += 1
                continue
            seen.add(e.event_id)
            fresh.append(e)
        # Erasure rule (docs/storage.md): an erased user's older events are dropped, not learned.
        screened = self.store.screen_erased(fresh)
        for user_id in screened.forget:
            self.model.forget_user(user_id)
        fresh, outcome.erased = screened.kept, screened.dropped
        # Event time orders a user's events; ties keep arrival order (sort is stable).
        fresh.sort(key=lambda e: e.ts)
        result = self.model.learn(fresh) if fresh else None
        if result is not None and result.snapshot is not None:
            self.store.publish_model(result.snapshot, self.base_model)
            self._published.add(result.snapshot.version)
        self.ensure_published()
        written = self.store.commit_batch(
            model_version=result.model_version if result else self.model.model_version,
            updates=result.updates if result else {},
            events=fresh,
            offsets=self._offsets(records),
        )
        # Erased while this batch was learning: nothing was stored for them; forget them too.
        for user_id in set(result.updates if result else ()) - set(written):
            self.model.forget_user(user_id)
        outcome.applied = len(fresh)
        outcome.users = len(result.updates) if result else 0
        outcome.loss = result.loss if result else None
        outcome.max_event_ts = max((e.ts for e in fresh), default=None)
        outcome.seconds = time.perf_counter() - started
        return outcome

    def apply_items(self, items: Sequence[Item]) -> None:
        latest = list({i.item_id: i for i in items}.values())
        self.model.upsert_items(latest)
        self.store.upsert_items(latest)
        ids = self.model.item_ids()
        index = {item_id: row for row, item_id in enumerate(ids)}
        matrix = self.model.item_matrix()
        rows = [index[i.item_id] for i in latest]
        self.ensure_published()
        self.store.write_item_vectors(self.model.model_version, [ids[r] for r in rows], matrix[rows])
