"""The erasure rule as the worker applies it: BatchProcessor + a real model + real Postgres."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from sqlalchemy import Engine, text

from models.decayed_mean import DecayedMeanModel
from storage.repository import VectorStore
from stream.processor import BatchProcessor
from stream.records import RawRecord
from stream.schema import Limits
from tests.fakes import HashEncoder
from tests.integration.storage.conftest import DIM

pytestmark = pytest.mark.integration

TOPICS = {"interest.ratings": "rating", "interest.items": "item"}


class Feed:
    def __init__(self) -> None:
        self.offset = 0

    def records(self, topic: str, values: list[dict]) -> list[RawRecord]:
        out = []
        for v in values:
            out.append(
                RawRecord(topic, 0, self.offset, str(v.get("user_id", "")).encode(), json.dumps(v).encode())
            )
            self.offset += 1
        return out


def _rating(event_id: str, user_id: str, item_id: str, ts: float) -> dict:
    return {"event_id": event_id, "user_id": user_id, "item_id": item_id, "ts": int(ts * 1000), "rating": 4}


def test_worker_drops_in_flight_events_of_an_erased_user(store: VectorStore, engine: Engine) -> None:
    model = DecayedMeanModel(HashEncoder(dim=DIM))
    proc = BatchProcessor(model, store, TOPICS, Limits(), base_model="hash")
    feed = Feed()
    now = time.time()
    items = [{"item_id": f"i{n}", "text": f"movie number {n} drama"} for n in range(5)]
    proc.process(feed.records("interest.items", items))
    first = proc.process(
        feed.records(
            "interest.ratings",
            [_rating("a1", "alice", "i1", now), _rating("b1", "bob", "i2", now)],
        )
    )
    assert first.applied == 2 and first.users == 2

    store.erase_user("alice", grace=timedelta(minutes=10))  # e.g. `istream erase alice` elsewhere
    in_flight = proc.process(
        feed.records(
            "interest.ratings",
            [_rating("a2", "alice", "i3", now + 1), _rating("b2", "bob", "i3", now + 1)],
        )
    )
    assert in_flight.erased == 1 and in_flight.applied == 1
    assert "alice" not in model.known_users()  # the worker's memory of her is gone too
    with engine.connect() as conn:
        mentions = (
            conn.execute(text("SELECT count(*) FROM applied_events WHERE user_id = 'alice'")).scalar_one()
            + conn.execute(
                text("SELECT count(*) FROM user_interest_vectors WHERE user_id = 'alice'")
            ).scalar_one()
        )
    assert mentions == 0
    # A replay of her old events is dropped as well (their dedup rows went with her).
    assert proc.process(feed.records("interest.ratings", [_rating("a1", "alice", "i1", now)])).erased == 1

    # Events stamped after the grace window: a new life, built from those events only.
    proc.process(feed.records("interest.ratings", [_rating("a3", "alice", "i4", now + 3600)]))
    row = store.current("alice")
    assert row is not None and row.version == 1 and row.n_events == 1
