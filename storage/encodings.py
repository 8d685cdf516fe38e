"""Persist and restore the base-encoding cache through `base_encodings`, so a restart does not re-encode.

Rows are keyed by (base version, sha1 of the text): an encoding is only reused by
the exact base that produced it, and the texts themselves are not copied here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert

from models.encoding_cache import EncodingCache, text_key
from storage.schema import BaseEncoding

log = logging.getLogger(__name__)
_CHUNK = 1000


class CachedEncoder(Protocol):
    version: str
    cache: EncodingCache


def restore_encodings(engine: Engine, encoder: CachedEncoder) -> int:
    """Load every stored encoding of this base version into the encoder's cache; returns how many."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(BaseEncoding.text_sha1, BaseEncoding.vector).where(
                BaseEncoding.base_version == encoder.version
            )
        )
        return encoder.cache.restore_hashed((key, np.asarray(vec, dtype=np.float32)) for key, vec in rows)


def save_encodings(engine: Engine, base_version: str, entries: Iterable[tuple[str, np.ndarray]]) -> int:
    """Store (text, vector) pairs not stored yet; returns how many rows were offered."""
    rows: list[dict[str, Any]] = [
        {"base_version": base_version, "text_sha1": text_key(text), "vector": np.asarray(vec, np.float32)}
        for text, vec in entries
    ]
    with engine.begin() as conn:
        for i in range(0, len(rows), _CHUNK):
            stmt = insert(BaseEncoding).values(rows[i : i + _CHUNK])
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["base_version", "text_sha1"]))
    return len(rows)


def persist_encodings(engine: Engine, encoder: CachedEncoder, texts: Iterable[str] | None = None) -> int:
    """Store what the encoder's cache holds and the store lacks (of `texts` only, when given)."""
    entries = encoder.cache.unsaved(texts)
    n = save_encodings(engine, encoder.version, entries)
    encoder.cache.mark_saved(t for t, _ in entries)
    return n


def model_encoder(model: object) -> CachedEncoder | None:
    """The model's base encoder when it has a persistable cache (fakes and baselines may not)."""
    enc = getattr(model, "encoder", None)
    return enc if isinstance(getattr(enc, "cache", None), EncodingCache) and hasattr(enc, "version") else None
