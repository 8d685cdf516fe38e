"""A restarted worker goes on counting item co-occurrence from the published version.

The learned model with co-occurrence factors on the real embedded Postgres: a worker learns a
few batches and publishes after each; most versions' weights carry only the pairs counted since
the last checkpoint and name it (`model_versions.weights_base`). A worker started afterwards
restores the newest version and, through the name, the checkpoint: its counts are the first
worker's, pair for pair, and so are its item vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text

from models.finetune import FineTunedModel
from stream.processor import BatchProcessor
from tests.integration.test_weights_safety import clicks, db_url, items, processor  # noqa: F401

pytestmark = pytest.mark.integration


def worker(db_url: str) -> BatchProcessor:  # noqa: F811
    return processor(db_url, cooc_rank=4, cooc_checkpoint_every=3)


def counts(proc: BatchProcessor) -> np.ndarray:
    model = proc.model
    assert isinstance(model, FineTunedModel) and model.cooc is not None
    model.cooc.counts.flush()
    return np.array(model.cooc.counts.matrix)


def test_a_restarted_worker_goes_on_from_the_published_counts(db_url: str) -> None:  # noqa: F811
    first = worker(db_url)
    first.process(items())
    for k, user in enumerate("abcde"):
        first.process(clicks(user, 3 * k, 7, partition=k % 2))
    expected, version = counts(first), first.model.model_version
    first.close()
    assert expected.sum() > 0
    with first.store.engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT model_version, weights_base FROM model_versions")).all())
    assert rows[version] is not None, "the newest version should carry pairs since a checkpoint"
    assert rows[rows[version]] is None  # which is a checkpoint itself

    second = worker(db_url)
    try:
        assert second.model.model_version == version
        np.testing.assert_array_equal(counts(second), expected)
    finally:
        second.close()
