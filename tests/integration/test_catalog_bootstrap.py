"""A worker reads the catalog topic to its end before it learns its first batch.

Kafka orders records within a partition, not across topics: under a backlog a worker may be
handed thousands of events before the catalog records of the items they name (measured on
ML-100K: 21,700 of 100,000 ratings learned with no item known). Here the events are produced
first and the catalog after them, on the real embedded broker and Postgres.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from storage.db import make_engine
from stream.broker import EmbeddedBroker, ensure_topics, make_producer
from stream.producer import EventProducer
from stream.schema import Limits
from stream.settings import Settings
from stream.sources import synthetic_log
from stream.topics import read_catalog
from tests.helpers import applied_events, start_worker, stop_worker, wait_for

pytestmark = pytest.mark.integration


def test_catalog_is_read_before_the_first_event(broker: EmbeddedBroker, db_url: str, tmp_path: Path) -> None:
    settings = Settings()
    bootstrap = broker.bootstrap
    ensure_topics(bootstrap, [*settings.event_topics, settings.topic_dead_letter], settings.partitions)
    ensure_topics(bootstrap, [settings.topic_items], settings.partitions, compacted=[settings.topic_items])
    records = synthetic_log(n_users=20, n_events=400, seed=5)
    items = [r for r in records if r["type"] == "item"]
    events = [r for r in records if r["type"] != "item"]
    producer = EventProducer(make_producer(bootstrap), settings)
    producer.send_all(events)  # the events first,
    producer.send_all(items)  # then the catalog they name

    found, complete = read_catalog(bootstrap, settings, Limits(), timeout_s=30)
    assert complete and sorted(i.item_id for i in found) == sorted(i["item_id"] for i in items)

    log = tmp_path / "worker.log"
    worker = start_worker(bootstrap, db_url, log, ISTREAM_BATCH_SIZE="50")
    try:
        wait_for(lambda: applied_events(db_url) >= len(events), 180, f"{len(events)} applied", worker, log)
    finally:
        assert stop_worker(worker) == 0, log.read_text()[-3000:]
    out = log.read_text()
    first_batch = out.index("batch p")
    assert (
        f"catalog: {len(items)} items from {settings.topic_items} before the first event" in out[:first_batch]
    )
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            first = conn.execute(
                text("SELECT vector::real[] FROM user_interest_vectors WHERE version = 1")
            ).all()
    finally:
        engine.dispose()
    # Every user's first vector was made from items the worker already knew (none is empty).
    assert len(first) == 20 and all(np.linalg.norm(np.asarray(v)) > 0 for (v,) in first)
