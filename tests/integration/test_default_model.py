"""The learned default model and the vector width of the database it writes to (issue 11, item 1)."""

from __future__ import annotations

import pytest

from storage.db import make_engine
from storage.repository import VectorStore
from stream.broker import EmbeddedBroker
from stream.runtime import published_dim, vector_width
from stream.settings import DEFAULT_MODEL, Settings
from tests.helpers import run_cli

pytestmark = pytest.mark.integration


def test_the_default_is_learned_and_sets_the_width_of_a_fresh_database() -> None:
    s = Settings()
    assert s.model == DEFAULT_MODEL != "decayed_mean"
    assert DEFAULT_MODEL in s.backtest_models.split(",") and "decayed_mean" in s.backtest_models.split(",")
    assert vector_width(s) == published_dim(s) == s.model_dim + 1  # [user, 1] / [item, bias]
    assert vector_width(Settings(model="decayed_mean")) == 384
    assert vector_width(Settings(vector_dim=16)) == 16  # an explicit width wins


def test_a_worker_on_a_database_of_another_width_names_the_fix(broker: EmbeddedBroker, db_url: str) -> None:
    """conftest's `db_url` is migrated for 384-d vectors; the default model writes 65-d ones."""
    store = VectorStore(make_engine(db_url))
    assert store.dim == 384
    store.engine.dispose()
    env = {"ISTREAM_KAFKA_BOOTSTRAP": broker.bootstrap, "ISTREAM_DATABASE_URL": db_url}
    out = run_cli("worker", env={**env, "ISTREAM_METRICS_PORT": "0"}, timeout=300)
    assert out.returncode != 0
    want = published_dim(Settings())
    assert out.stderr.strip().splitlines() == [
        f"istream: the database stores 384-d vectors but ISTREAM_MODEL={DEFAULT_MODEL} writes {want}-d; "
        f"use a database migrated with ISTREAM_VECTOR_DIM={want}"
    ]
