"""Writes and reads of versioned interest vectors.

One batch of the worker is one transaction: dedup rows, new versions, the
current-row upsert and the consumed offsets commit together or not at all, so
a crash at any moment leaves Postgres at a batch boundary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select
from sqlalchemy.dialects.postgresql import insert

from models.core import ModelSnapshot, UserUpdate
from models.events import Event, Item
from storage.schema import (
    AppliedEvent,
    CatalogItem,
    ConsumedOffset,
    ItemVector,
    ModelVersion,
    UserInterestCurrent,
    UserInterestVector,
    UserState,
)

# Stay well under Postgres' 65,535 bind parameters per statement.
_CHUNK = 2000


def _ts(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, tz=UTC)


def _chunks(rows: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


@dataclass(frozen=True, slots=True)
class OffsetMark:
    topic: str
    partition: int
    next_offset: int


class VectorStore:
    def __init__(self, engine: Engine, group_id: str = "interest-stream") -> None:
        self.engine = engine
        self.group_id = group_id

    # ---- reads -------------------------------------------------------------
    def applied_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        if not event_ids:
            return set()
        found: set[str] = set()
        with self.engine.connect() as conn:
            for chunk in _chunks(list(event_ids)):
                found.update(
                    conn.execute(
                        select(AppliedEvent.event_id).where(AppliedEvent.event_id.in_(chunk))
                    ).scalars()
                )
        return found

    def stored_offsets(self) -> dict[tuple[str, int], int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ConsumedOffset.topic, ConsumedOffset.partition, ConsumedOffset.next_offset).where(
                    ConsumedOffset.group_id == self.group_id
                )
            ).all()
        return {(t, p): o for t, p, o in rows}

    def current(self, user_id: str) -> UserInterestCurrent | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(UserInterestCurrent).where(UserInterestCurrent.user_id == user_id)
            ).first()
        return row  # type: ignore[return-value]

    def total_events(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(select(func.coalesce(func.sum(UserInterestCurrent.n_events), 0))).scalar_one()
            )

    def load_user_states(self, model_version: str) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(UserState.user_id, UserState.state).where(UserState.model_version == model_version)
            ).all()
        return {u: s for u, s in rows}

    def load_catalog(self) -> list[Item]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(CatalogItem.item_id, CatalogItem.text, CatalogItem.attrs)).all()
        return [Item(item_id=i, text=t, attrs=a or {}) for i, t, a in rows]

    # ---- catalog and models --------------------------------------------------
    def upsert_items(self, items: Sequence[Item]) -> None:
        if not items:
            return
        latest = {i.item_id: i for i in items}  # the last record of an item wins
        rows = [{"item_id": i.item_id, "text": i.text, "attrs": dict(i.attrs)} for i in latest.values()]
        with self.engine.begin() as conn:
            for chunk in _chunks(rows):
                stmt = insert(CatalogItem).values(list(chunk))
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[CatalogItem.item_id],
                        set_={
                            "text": stmt.excluded.text,
                            "attrs": stmt.excluded.attrs,
                            "updated_at": func.now(),
                        },
                    )
                )

    def write_item_vectors(self, model_version: str, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        rows = [
            {"item_id": i, "model_version": model_version, "vector": np.asarray(v, dtype=np.float32)}
            for i, v in zip(item_ids, vectors, strict=True)
        ]
        with self.engine.begin() as conn:
            for chunk in _chunks(rows, 500):
                stmt = insert(ItemVector).values(list(chunk))
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[ItemVector.item_id, ItemVector.model_version],
                        set_={"vector": stmt.excluded.vector},
                    )
                )

    def publish_model(self, snapshot: ModelSnapshot, base_model: str) -> None:
        """Register a model version and its item vectors (before any user row names it)."""
        self.write_item_vectors(snapshot.version, snapshot.item_ids, snapshot.item_vectors)
        with self.engine.begin() as conn:
            stmt = insert(ModelVersion).values(
                model_version=snapshot.version,
                base_model=base_model,
                config=dict(snapshot.config),
                parent=snapshot.parent,
                metrics=dict(snapshot.metrics),
                weights=snapshot.weights,
            )
            conn.execute(stmt.on_conflict_do_nothing(index_elements=[ModelVersion.model_version]))

    # ---- the batch transaction -------------------------------------------------
    def commit_batch(
        self,
        model_version: str,
        updates: Mapping[str, UserUpdate],
        events: Sequence[Event],
        offsets: Sequence[OffsetMark] = (),
        user_states: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> dict[str, int]:
        """Apply one batch atomically; returns user_id -> the version written."""
        versions: dict[str, int] = {}
        with self.engine.begin() as conn:
            if events:
                ev_rows = [
                    {
                        "event_id": e.event_id,
                        "user_id": e.user_id,
                        "kind": e.kind,
                        "item_id": e.target_item,
                        "ts": _ts(e.ts),
                        "rating": e.rating,
                    }
                    for e in events
                ]
                for chunk in _chunks(ev_rows):
                    conn.execute(insert(AppliedEvent).values(list(chunk)).on_conflict_do_nothing())
            # Sorted so that two writers lock users in the same order and cannot deadlock.
            ordered = [updates[u] for u in sorted(updates)]
            for chunk in _chunks(ordered, 500):
                rows = [
                    {
                        "user_id": u.user_id,
                        "version": 1,
                        "model_version": model_version,
                        "vector": np.asarray(u.vector, dtype=np.float32),
                        "n_events": u.n_applied,
                        "last_event_ts": _ts(u.last_event_ts),
                        "cold_start": u.cold_start,
                    }
                    for u in chunk
                ]
                stmt = insert(UserInterestCurrent).values(rows)
                cur = UserInterestCurrent.__table__.c
                # The row lock taken by the upsert serialises writers per user, so
                # versions stay 1, 2, 3... even with two workers at once.
                stmt = stmt.on_conflict_do_update(
                    index_elements=[UserInterestCurrent.user_id],
                    set_={
                        "version": cur.version + 1,
                        "model_version": stmt.excluded.model_version,
                        "vector": stmt.excluded.vector,
                        "n_events": cur.n_events + stmt.excluded.n_events,
                        "last_event_ts": func.greatest(cur.last_event_ts, stmt.excluded.last_event_ts),
                        "updated_at": func.clock_timestamp(),
                        "cold_start": stmt.excluded.cold_start,
                    },
                ).returning(cur.user_id, cur.version, cur.n_events, cur.last_event_ts)
                written = conn.execute(stmt).all()
                by_user = {r.user_id: r for r in written}
                history = [
                    {
                        **row,
                        "version": by_user[row["user_id"]].version,
                        "n_events": by_user[row["user_id"]].n_events,
                        "last_event_ts": by_user[row["user_id"]].last_event_ts,
                    }
                    for row in rows
                ]
                conn.execute(insert(UserInterestVector).values(history))
                versions.update({r.user_id: r.version for r in written})
            if user_states:
                rows = [
                    {"user_id": u, "model_version": model_version, "state": dict(s)}
                    for u, s in sorted(user_states.items())
                ]
                for chunk in _chunks(rows, 500):
                    stmt = insert(UserState).values(list(chunk))
                    conn.execute(
                        stmt.on_conflict_do_update(
                            index_elements=[UserState.user_id],
                            set_={
                                "model_version": stmt.excluded.model_version,
                                "state": stmt.excluded.state,
                                "updated_at": func.now(),
                            },
                        )
                    )
            if offsets:
                rows = [
                    {
                        "group_id": self.group_id,
                        "topic": o.topic,
                        "partition": o.partition,
                        "next_offset": o.next_offset,
                    }
                    for o in offsets
                ]
                stmt = insert(ConsumedOffset).values(rows)
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[
                            ConsumedOffset.group_id,
                            ConsumedOffset.topic,
                            ConsumedOffset.partition,
                        ],
                        set_={
                            "next_offset": func.greatest(
                                ConsumedOffset.__table__.c.next_offset, stmt.excluded.next_offset
                            ),
                            "updated_at": func.now(),
                        },
                    )
                )
        return versions
