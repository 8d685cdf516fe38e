"""Weights read from model_versions cannot run code, and must match their recorded SHA-256.

The learned (adapter) model on the real embedded Postgres: a trainer publishes versions,
a follower adopts them before each batch (the adoption path of every scale-out worker,
and of a worker's start-up). Then someone with write access to the table stores a
crafted pickle, swaps a blob, or leaves a row without a checksum: the follower refuses
each one with a log line and a metric, keeps its version, and goes on applying events.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from models import weights_io
from models.finetune import FineTunedModel
from storage.db import make_engine, upgrade
from storage.repository import VectorStore
from stream.metrics import WorkerMetrics
from stream.processor import BatchProcessor
from stream.records import RawRecord
from stream.schema import Limits
from tests.fakes import HashEncoder
from tests.unit.test_weights_io import crafted_blobs

pytestmark = pytest.mark.integration

TOPICS = {"interest.clicks": "click", "interest.items": "item"}
DIM = 16  # the adapter publishes DIM + 1 (the bias column)
WORDS = ["space", "rocket", "pasta", "soup", "goal", "league", "piano", "guitar"]


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    upgrade(empty_db_url, vector_dim=DIM + 1)
    return empty_db_url


def processor(db_url: str, metrics: WorkerMetrics | None = None, **options: Any) -> BatchProcessor:
    model = FineTunedModel(
        HashEncoder(24),
        "adapter",
        dim=DIM,
        history=8,
        seed=0,
        publish_every_steps=1,
        events_per_step=1,
        budget_unit="events",  # every batch a step (its clicks wrap round to items already had)
        **options,
    )
    proc = BatchProcessor(
        model,
        VectorStore(make_engine(db_url), group_id="g"),
        TOPICS,
        Limits(),
        "hash",
        on_weights_refused=metrics.refused_weights if metrics else None,
    )
    proc.restore()
    return proc


def items() -> list[RawRecord]:
    return [
        RawRecord(
            "interest.items", 0, i, f"i{i}".encode(), json.dumps({"item_id": f"i{i}", "text": t}).encode()
        )
        for i, t in enumerate(f"{a} {b}" for a in WORDS for b in WORDS[:3])
    ]


def clicks(user: str, start: int, n: int, partition: int) -> list[RawRecord]:
    return [
        RawRecord(
            "interest.clicks",
            partition,
            k,
            user.encode(),
            json.dumps(
                {"event_id": f"{user}-{k}", "user_id": user, "item_id": f"i{k % 24}", "ts": 1000 * (k + 1)}
            ).encode(),
        )
        for k in range(start, start + n)
    ]


def store_row(proc: BatchProcessor, version: str, blob: bytes, sha256: str | None) -> None:
    """What an attacker (or a damaged disk) leaves in the registry: the newest row of the model."""
    with proc.store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO model_versions (model_version, base_model, config, metrics, weights, "
                "weights_sha256, created_at) VALUES (:v, 'hash', CAST(:c AS jsonb), '{}', :w, :s, "
                "clock_timestamp() + interval '1 second')"
            ),
            {"v": version, "c": json.dumps({"model": "adapter"}), "w": blob, "s": sha256},
        )


def refused(metrics: WorkerMetrics, kind: str) -> float:
    return metrics.weights_refused.labels(kind)._value.get()  # type: ignore[attr-defined]


@pytest.fixture
def trainer_and_follower(db_url: str) -> Any:
    metrics = WorkerMetrics(CollectorRegistry())
    trainer, follower = processor(db_url), processor(db_url, metrics)
    trainer.set_trainer(True)
    follower.set_trainer(False)
    trainer.process(items())
    trainer.process(clicks("a", 0, 8, partition=0))
    untrained = follower.model.model_version
    out = follower.process(clicks("b", 0, 4, partition=1))
    # Adopted the trainer's weights. (The version it then names is derived from the loaded
    # state laid out in its own catalog order, so it need not equal the trainer's name.)
    assert out.applied == 4 and out.model_version != untrained
    yield trainer, follower, metrics
    trainer.close()
    follower.close()


def test_a_crafted_pickle_is_refused_and_runs_nothing(
    trainer_and_follower: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, follower, metrics = trainer_and_follower
    good = follower.model.model_version
    marker = tmp_path / "pwned"
    for kind, blob in crafted_blobs(marker).items():
        # The attacker can compute the checksum too: the format is what stops them.
        store_row(follower, f"adapter-evil-{kind}@hash-24", blob, weights_io.sha256_hex(blob))
        with caplog.at_level(logging.ERROR, logger="stream.processor"):
            out = follower.process(clicks("b", 100 * len(follower.refused_weights) + 4, 4, partition=1))
        assert not marker.exists(), "loading the blob ran code"
        assert out.applied == 4 and out.model_version == good  # went on, on the version it had
        assert f"refused the weights of model version adapter-evil-{kind}@hash-24 (format" in caplog.text
    assert refused(metrics, "format") == 2
    assert follower.store.current("b").model_version == good
    # A worker starting now (restore at start-up) refuses it too, and starts on its own weights.
    fresh = processor(follower.store.engine.url.render_as_string(hide_password=False))
    assert set(fresh.refused_weights) == {"adapter-evil-pickle@hash-24"}
    assert fresh.process(clicks("c", 0, 3, partition=2)).applied == 3
    assert not marker.exists()


def test_a_blob_that_does_not_match_its_checksum_is_refused(trainer_and_follower: Any) -> None:
    trainer, follower, metrics = trainer_and_follower
    good = follower.model.model_version
    trainer.process(clicks("a", 8, 8, partition=0))  # a newer version ...
    newer = trainer.model.model_version
    assert newer != good
    with trainer.store.engine.begin() as conn:  # ... whose blob is swapped for an older, valid one
        conn.execute(
            text(
                "UPDATE model_versions SET weights = (SELECT weights FROM model_versions "
                "WHERE model_version = :g) WHERE model_version = :n"
            ),
            {"g": good, "n": newer},
        )
    out = follower.process(clicks("b", 4, 4, partition=1))
    assert out.applied == 4 and out.model_version == good
    assert "SHA-256 mismatch" in follower.refused_weights[newer]
    assert refused(metrics, "checksum") == 1
    # A row without a checksum (published before migration 0003) is refused as well.
    trainer.process(clicks("a", 16, 8, partition=0))
    newest = trainer.model.model_version
    with trainer.store.engine.begin() as conn:
        conn.execute(
            text("UPDATE model_versions SET weights_sha256 = NULL WHERE model_version = :n"), {"n": newest}
        )
    assert follower.process(clicks("b", 8, 4, partition=1)).model_version == good
    assert refused(metrics, "no_checksum") == 1
    # And a good newer version is adopted again.
    trainer.process(clicks("a", 24, 8, partition=0))
    assert follower.process(clicks("b", 12, 4, partition=1)).model_version != good
    assert set(follower.refused_weights) == {newer, newest}
