"""SQLAlchemy 2.0 typed models of DESIGN.md's SQL contract."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import (
    REAL,
    BigInteger,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    cast,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement


class Embedding(TypeDecorator[np.ndarray]):
    """A vector column that is pgvector `vector(d)` or the `real[]` fallback (see storage.vectors).

    Values cross the wire as `real[]` both ways: pgvector casts `real[]` to `vector`
    on assignment and back implicitly, so ORM code never needs to know the backend.
    """

    impl = ARRAY(REAL)
    cache_ok = True

    def bind_expression(self, bindvalue: ColumnElement[Any]) -> ColumnElement[Any]:
        return cast(bindvalue, ARRAY(REAL))

    def column_expression(self, colexpr: ColumnElement[Any]) -> ColumnElement[Any]:
        return cast(colexpr, ARRAY(REAL))

    def process_bind_param(self, value: Any, dialect: Any) -> list[float] | None:
        if value is None:
            return None
        return np.asarray(value, dtype=np.float32).reshape(-1).tolist()

    def process_result_value(self, value: Any, dialect: Any) -> np.ndarray | None:
        if value is None:
            return None
        return np.asarray(value, dtype=np.float32)


class Base(DeclarativeBase):
    pass


class ModelVersion(Base):
    __tablename__ = "model_versions"

    model_version: Mapped[str] = mapped_column(String(200), primary_key=True)
    base_model: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    parent: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    weights_uri: Mapped[str | None] = mapped_column(Text)
    weights: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Hex SHA-256 of `weights`, written at publish and checked before a worker loads them (0003).
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    # A version whose weights these build on (a co-occurrence checkpoint), loaded with them (0006).
    weights_base: Mapped[str | None] = mapped_column(String(200))
    # What the version serves a user it knows nothing of; NULL when its model has no prior (0004).
    prior_vector: Mapped[Any] = mapped_column(Embedding(), nullable=True)


class CatalogItem(Base):
    """The catalog as last seen on the items topic, so SQL users can join titles."""

    __tablename__ = "items"

    item_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    attrs: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ItemVector(Base):
    __tablename__ = "item_vectors"

    item_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(200), primary_key=True)
    vector: Mapped[Any] = mapped_column(Embedding())


class UserInterestVector(Base):
    """Append-only history; pruned by retention, never rewritten."""

    __tablename__ = "user_interest_vectors"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version: Mapped[str] = mapped_column(String(200))
    vector: Mapped[Any] = mapped_column(Embedding())
    n_events: Mapped[int] = mapped_column(BigInteger)
    last_event_ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.clock_timestamp()
    )
    cold_start: Mapped[str | None] = mapped_column(String(32))


class UserCurrentVersion(Base):
    """Which history row is each user's newest, with the running counters (written per batch)."""

    __tablename__ = "user_current_versions"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    n_events: Mapped[int] = mapped_column(BigInteger)
    last_event_ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.clock_timestamp()
    )


class UserInterestCurrent(Base):
    """One row per user: the newest version. A read-only VIEW (user_current_versions joined to
    the history) since migration 0002; mapped here for queries, never written."""

    __tablename__ = "user_interests_current"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str] = mapped_column(String(200))
    vector: Mapped[Any] = mapped_column(Embedding())
    n_events: Mapped[int] = mapped_column(BigInteger)
    last_event_ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.clock_timestamp()
    )
    cold_start: Mapped[str | None] = mapped_column(String(32))


class AppliedEvent(Base):
    """Event ids already applied: replays and retries are deduplicated against it.

    Also the user's interaction log (item, kind, weight) for 'skip seen items' and explain.
    """

    __tablename__ = "applied_events"

    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    item_id: Mapped[str | None] = mapped_column(String(128))
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    rating: Mapped[float | None] = mapped_column(Float)


class ConsumedOffset(Base):
    """Next offset to read per (group, topic, partition); written with the vectors it produced."""

    __tablename__ = "consumed_offsets"

    group_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    topic: Mapped[str] = mapped_column(String(250), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_offset: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class UserState(Base):
    """Serialised per-user model state, so a restarted worker continues where it stopped."""

    __tablename__ = "user_states"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(200))
    state: Mapped[dict[str, Any]] = mapped_column(JSONB)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class BaseEncoding(Base):
    """Cached base-model encodings of texts, so a restart does not re-encode the catalog."""

    __tablename__ = "base_encodings"

    base_version: Mapped[str] = mapped_column(String(200), primary_key=True)
    text_sha1: Mapped[str] = mapped_column(String(40), primary_key=True)
    vector: Mapped[Any] = mapped_column(Embedding())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class StorageMeta(Base):
    """Facts fixed at migration time (vector backend and width) and the erasure salt.

    Never granted to the read-only role: the salt would let a reader test guesses
    against the hashed ids in `erased_users`.
    """

    __tablename__ = "storage_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ErasedUser(Base):
    """Tombstone of an erased user, keyed by a salted hash so it holds no personal data.

    The worker drops the user's events stamped before `drop_until` (in flight,
    retried or replayed) instead of resurrecting the user.
    """

    __tablename__ = "erased_users"

    user_hash: Mapped[bytes] = mapped_column(BYTEA, primary_key=True)
    erased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    drop_until: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ErasureAudit(Base):
    """One row per erasure: when, by which database role, how many rows went — no user id, no hash."""

    __tablename__ = "erasure_audit"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    erased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    actor: Mapped[str] = mapped_column(Text, server_default=func.current_user())
    rows_deleted: Mapped[dict[str, Any]] = mapped_column(JSONB)
