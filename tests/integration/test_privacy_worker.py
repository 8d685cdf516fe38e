"""Differential privacy through the batch processor on real Postgres: ε on every published
version (model_versions.metrics), in the batch outcome (what the gauges show) and in the
line `istream status` prints."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from models.finetune import FineTunedModel
from storage.db import make_engine, upgrade
from storage.repository import VectorStore
from storage.schema import ModelVersion
from stream.processor import BatchProcessor
from stream.schema import Limits
from stream.status import privacy_line
from tests.fakes import HashEncoder
from tests.integration.test_processor import TOPICS, clicks, items

pytestmark = pytest.mark.integration


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    upgrade(empty_db_url, vector_dim=16)  # dim 15 + the bias column
    return empty_db_url


def test_epsilon_is_recorded_per_version_and_shown_by_status(db_url: str) -> None:
    store = VectorStore(make_engine(db_url), group_id="g")
    model = FineTunedModel(
        HashEncoder(16),
        "adapter",
        dim=15,
        heads=3,  # 15 is not divisible by the default 2 heads
        history=8,
        publish_every_steps=1,
        dp_publish_every_steps=1,
        dp_epsilon=8.0,
        dp_delta=1e-3,
    )
    proc = BatchProcessor(model, store, TOPICS, Limits(), "hash")
    proc.restore()
    assert privacy_line(store) is None  # nothing DP-trained published yet
    proc.process(items())
    outcomes = [proc.process(clicks(k, 4, user=u)) for k in (0, 4) for u in ("u1", "u2")]
    assert all(o.dp_epsilon is not None for o in outcomes)
    with store.engine.connect() as conn:
        rows = conn.execute(select(ModelVersion.model_version, ModelVersion.metrics)).all()
    dp_rows = [m for _, m in rows if "dp_epsilon" in m]
    assert dp_rows, rows
    last = max(float(m["dp_epsilon"]) for m in dp_rows)
    assert 0 < last <= 8.0
    assert outcomes[-1].dp_epsilon == pytest.approx(model.privacy_state()["dp_epsilon"])
    line = privacy_line(store)
    assert line is not None and "of a budget of 8" in line and "epsilon" in line
    proc.close()
    store.engine.dispose()
