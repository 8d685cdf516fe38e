"""`istream replay` into a real broker (order, pacing) and `istream status` against real offsets."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from models.decayed_mean import DecayedMeanModel
from storage.db import make_engine, upgrade
from storage.repository import VectorStore
from stream.broker import EmbeddedBroker, ensure_topics
from stream.processor import BatchProcessor
from stream.records import RawRecord
from stream.schema import Limits
from stream.settings import Settings
from tests.fakes import HashEncoder
from tests.helpers import run_cli


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """These tests use the 16-d HashEncoder, so the schema is migrated for 16-d vectors."""
    upgrade(empty_db_url, vector_dim=16)
    return empty_db_url


pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, bootstrap: str, db_url: str = "") -> subprocess.CompletedProcess[str]:
    env = {"ISTREAM_KAFKA_BOOTSTRAP": bootstrap, "ISTREAM_PARTITIONS": "2"}
    if db_url:
        env["ISTREAM_DATABASE_URL"] = db_url
    return run_cli(*args, env=env)


def read_all(bootstrap: str, topic: str) -> list[tuple[int, int, dict]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    end = consumer.end_offsets(tps)
    out = []
    while any(consumer.position(tp) < end[tp] for tp in tps):
        for tp, msgs in consumer.poll(timeout_ms=500).items():
            out.extend((tp.partition, m.offset, json.loads(m.value)) for m in msgs)
    consumer.close()
    return out


def test_replay_keeps_each_users_order_and_scales_time(
    broker: EmbeddedBroker, db_url: str, tmp_path: Path
) -> None:
    s = Settings(partitions=2)
    ensure_topics(broker.bootstrap, [*s.event_topics, s.topic_dead_letter], 2)
    ensure_topics(broker.bootstrap, [s.topic_items], 2, compacted=[s.topic_items])
    lines = [{"type": "item", "item_id": "i1", "text": "space rocket"}]
    # u1's log order disagrees with its timestamps: the log order must win for u1.
    for n, (user, ts) in enumerate([("u1", 4000), ("u2", 1000), ("u1", 2000), ("u3", 3000), ("u2", 5000)]):
        lines.append({"type": "click", "event_id": f"e{n}", "user_id": user, "item_id": "i1", "ts": ts})
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    started = time.monotonic()
    out = cli("replay", str(log), "--speed", "2", bootstrap=broker.bootstrap)
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert "interest.clicks: 5" in out.stdout and "interest.items: 1" in out.stdout
    assert "(unroutable lines)" in out.stdout
    assert took >= 2.0  # 4 s of event time at 2x (1000 -> 5000 ms)
    clicks = read_all(broker.bootstrap, s.topic_clicks)
    by_user: dict[str, list[str]] = {}
    for _, _, rec in sorted(clicks, key=lambda x: (x[0], x[1])):
        by_user.setdefault(rec["user_id"], []).append(rec["event_id"])
    assert by_user == {"u1": ["e0", "e2"], "u2": ["e1", "e4"], "u3": ["e3"]}

    # status: commit one partition's records through the processor, then ask.
    proc = BatchProcessor(
        DecayedMeanModel(HashEncoder(16)),
        VectorStore(make_engine(db_url), s.group_id),
        {**s.event_topics, s.topic_items: "item"},
        Limits(),
        "hash",
    )
    first = [(p, o, r) for p, o, r in clicks if p == clicks[0][0]]
    proc.process(
        [
            RawRecord(s.topic_clicks, p, o, None, json.dumps(r).encode(), int(time.time() * 1000))
            for p, o, r in first
        ]
    )
    status = cli("status", bootstrap=broker.bootstrap, db_url=db_url)
    assert status.returncode == 0, status.stderr
    rows = {
        tuple(line.split()[:2]): line.split()
        for line in status.stdout.splitlines()
        if line.startswith("interest.clicks")
    }
    done, other = str(clicks[0][0]), str(1 - clicks[0][0])
    assert rows[("interest.clicks", done)][4] == "0"  # lag 0 for the committed partition
    assert int(rows[("interest.clicks", other)][4]) == len(clicks) - len(first)
    assert f"total lag {len(clicks) - len(first) + 1} records" in status.stdout  # + the item


def test_end_offsets_count_every_record_of_a_batch(broker: EmbeddedBroker) -> None:
    """Tansu's ListOffsets answers per record batch; lag and counts must not shrink with batching."""
    from stream.broker import make_producer, topic_end_offsets

    ensure_topics(broker.bootstrap, ["t"], 1)
    producer = make_producer(broker.bootstrap, linger_ms=100)
    futures = [producer.send("t", key=b"k", value=b"v%d" % i) for i in range(4)]
    assert [f.get(10).offset for f in futures] == [0, 1, 2, 3]
    producer.close()
    assert topic_end_offsets(broker.bootstrap, "t") == 4
