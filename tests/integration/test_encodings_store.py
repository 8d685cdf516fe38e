"""The base-encoding cache survives a restart through Postgres (real embedded server)."""

from __future__ import annotations

import numpy as np
import pytest

from models.encoder import EncodingCache
from storage.db import make_engine
from storage.encodings import persist_encodings, restore_encodings

pytestmark = pytest.mark.integration


class CacheOnly:
    def __init__(self, version: str) -> None:
        self.version = version
        self.cache = EncodingCache()


def test_encodings_round_trip_per_base_version(db_url: str) -> None:
    engine = make_engine(db_url)
    first = CacheOnly("base-a")
    vecs = {t: np.random.default_rng(i).standard_normal(8).astype(np.float32) for i, t in enumerate("xyz")}
    for text, vec in vecs.items():
        first.cache.put(text, vec)
    assert persist_encodings(engine, first) == 3
    assert persist_encodings(engine, first) == 0  # stored rows are not offered again
    first.cache.put("w", vecs["x"])
    assert persist_encodings(engine, first, texts=["w", "x"]) == 1  # of these texts, what is new

    restarted = CacheOnly("base-a")
    assert restore_encodings(engine, restarted) == 4
    np.testing.assert_allclose(restarted.cache.get("y"), vecs["y"], rtol=1e-6)
    assert restarted.cache.get("never seen") is None
    assert len(restarted.cache) == 1  # restored rows join the LRU when their text is asked for
    assert persist_encodings(engine, restarted) == 0  # what was restored is not written back

    other_base = CacheOnly("base-b")
    assert restore_encodings(engine, other_base) == 0
    engine.dispose()
