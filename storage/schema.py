"""SQLAlchemy 2.0 typed models of DESIGN.md's SQL contract."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import BigInteger, DateTime, Float, Integer, LargeBinary, String, Text, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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
    vector: Mapped[Any] = mapped_column(Vector())


class UserInterestVector(Base):
    """Append-only history; pruned by retention, never rewritten."""

    __tablename__ = "user_interest_vectors"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version: Mapped[str] = mapped_column(String(200))
    vector: Mapped[Any] = mapped_column(Vector())
    n_events: Mapped[int] = mapped_column(BigInteger)
    last_event_ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.clock_timestamp()
    )
    cold_start: Mapped[str | None] = mapped_column(String(32))


class UserInterestCurrent(Base):
    """One row per user: the newest version."""

    __tablename__ = "user_interests_current"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str] = mapped_column(String(200))
    vector: Mapped[Any] = mapped_column(Vector())
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
    vector: Mapped[Any] = mapped_column(Vector())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
