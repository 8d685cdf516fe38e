"""End to end on the real embedded broker and Postgres: 1,000 events, 50 malformed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from sqlalchemy import text

from storage.db import make_engine
from stream.broker import ensure_topics, make_producer
from stream.producer import EventProducer
from stream.settings import Settings
from stream.sources import synthetic_log
from tests.helpers import applied_events, read_topic, start_worker, stop_worker, wait_for

pytestmark = pytest.mark.integration

N_USERS, N_EVENTS, N_BAD = 50, 1000, 50


def malformed(i: int) -> tuple[str, bytes]:
    """Fifty broken records of six kinds, spread over the three event topics."""
    base = {"event_id": f"bad-{i}", "user_id": f"user-{i % N_USERS}", "ts": 1_700_000_000_000}
    kinds = [
        ("interest.clicks", b'{"event_id": "bad", "user_id": '),  # bad JSON
        ("interest.ratings", json.dumps({**base, "item_id": "space-1", "rating": 3} | {"user_id": None})),
        ("interest.ratings", json.dumps({**base, "item_id": "space-1", "rating": 11})),
        ("interest.clicks", json.dumps({**base, "type": "purchase", "item_id": "space-1"})),
        ("interest.searches", json.dumps({**base, "query": "x" * 2000})),
        ("interest.clicks", json.dumps({**base, "item_id": "space-1", "ts": "last tuesday"})),
    ]
    topic, value = kinds[i % len(kinds)]
    return topic, value if isinstance(value, bytes) else value.encode()


def test_valid_events_applied_once_and_bad_ones_dead_lettered(
    broker: object, db_url: str, tmp_path: Path
) -> None:
    settings = Settings()
    bootstrap = broker.bootstrap  # type: ignore[attr-defined]
    ensure_topics(bootstrap, [*settings.event_topics, settings.topic_dead_letter], settings.partitions)
    ensure_topics(bootstrap, [settings.topic_items], settings.partitions, compacted=[settings.topic_items])

    records = synthetic_log(n_users=N_USERS, n_events=N_EVENTS - N_BAD, seed=7)
    events = [r for r in records if r["type"] != "item"]
    assert len(events) == N_EVENTS - N_BAD and len({e["user_id"] for e in events}) == N_USERS
    producer = make_producer(bootstrap)
    EventProducer(producer, settings).send_all(records)
    rng = random.Random(1)
    for i in rng.sample(range(N_BAD), N_BAD):
        topic, value = malformed(i)
        producer.send(topic, key=f"user-{i % N_USERS}".encode(), value=value)
    producer.flush()

    log = tmp_path / "worker.log"
    worker = start_worker(bootstrap, db_url, log)
    try:
        wait_for(lambda: applied_events(db_url) >= N_EVENTS - N_BAD, 180, "950 applied events", worker, log)
        dead = read_topic(bootstrap, settings.topic_dead_letter, N_BAD, timeout=60)
    finally:
        assert stop_worker(worker) == 0, log.read_text()[-3000:]

    assert applied_events(db_url) == N_EVENTS - N_BAD
    assert len(dead) == N_BAD
    assert all(d["reason"] and d["topic"].startswith("interest.") and d["offset"] >= 0 for d in dead)
    reasons = " | ".join(d["reason"] for d in dead)
    for words in ("invalid JSON", "user_id", "out of range", "disagrees", "longer than 1024", "RFC 3339"):
        assert words in reasons

    engine = make_engine(db_url)
    with engine.connect() as conn:
        per_user = dict(conn.execute(text("SELECT user_id, n_events FROM user_interests_current")).all())
        expected = {u: sum(1 for e in events if e["user_id"] == u) for u in per_user}
        assert per_user == expected and len(per_user) == N_USERS
        gaps = conn.execute(
            text(
                "SELECT user_id FROM user_interest_vectors GROUP BY user_id "
                "HAVING min(version) <> 1 OR max(version) <> count(*)"
            )
        ).all()
        assert gaps == []
        mismatched = conn.execute(
            text(
                """SELECT c.user_id FROM user_interests_current c
                   JOIN LATERAL (SELECT * FROM user_interest_vectors v WHERE v.user_id = c.user_id
                                 ORDER BY version DESC LIMIT 1) h ON true
                   WHERE h.version <> c.version OR h.vector <> c.vector OR h.n_events <> c.n_events
                      OR h.model_version <> c.model_version"""
            )
        ).all()
        assert mismatched == []
        # Every user vector names a model version whose item vectors exist.
        orphans = conn.execute(
            text(
                "SELECT count(*) FROM user_interests_current c WHERE NOT EXISTS "
                "(SELECT 1 FROM item_vectors i WHERE i.model_version = c.model_version)"
            )
        ).scalar_one()
        assert orphans == 0
        top = conn.execute(text("SELECT count(*) FROM user_top_items('user-0', 5, true)")).scalar_one()
        assert top == 5
    engine.dispose()
