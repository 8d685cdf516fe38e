"""Fuzzing the batch processor on the real embedded Postgres.

Generated batches mix valid records of every type, in-batch duplicates, records with
fields dropped or set to boundary values or arbitrary JSON, arbitrary bytes, empty
values, unknown topics, and valid records whose text Postgres cannot store (NUL, lone
surrogates). Each batch goes through `ResilientRunner` as the worker drives it. After
every batch: each record is either applied (its event_id in applied_events, its item in
the catalog) or on the dead-letter sink with a reason, never both; a record the
validator accepts and Postgres can store is never dead-lettered; events are counted
once; and the batch's offsets are committed.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text

from models.decayed_mean import DecayedMeanModel
from models.events import Event, Item
from storage.db import EmbeddedPostgres, libpq_url, make_engine, upgrade
from storage.repository import VectorStore
from stream.processor import BatchProcessor
from stream.records import RawRecord
from stream.resilience import ResilientRunner
from stream.schema import InvalidRecord, Limits, parse_topic_record
from tests.fakes import HashEncoder
from tests.fuzz_strategies import (
    KINDS,
    any_text,
    clean_text,
    encode,
    fuzz_settings,
    mutated_record,
    valid_record,
)

pytestmark = pytest.mark.integration

# Batches per run (about 5 records each; 60 took 88 s beside two CPU burners on a busy shared
# 2-core machine), counted in the README's reliability section.
EXAMPLES = 40
TOPICS = {
    "interest.clicks": "click",
    "interest.searches": "search",
    "interest.ratings": "rating",
    "interest.items": "item",
}
TOPIC_OF = {kind: topic for topic, kind in TOPICS.items()}
CATALOG = [Item(f"item-{i}", t) for i, t in enumerate(["space rocket", "pasta soup", "jazz piano", "goal"])]


class Harness:
    """One database and one processor for all examples (what a worker keeps between batches)."""

    def __init__(self, url: str) -> None:
        self.sink: list[dict[str, Any]] = []
        store = VectorStore(make_engine(url), group_id="fuzz")
        self.proc = BatchProcessor(
            DecayedMeanModel(HashEncoder(16)),
            store,
            TOPICS,
            Limits(),
            "hash",
            dead_letter_sink=self.sink.extend,
        )
        self.proc.restore()
        self.runner = ResilientRunner(self.proc, max_wait_s=0.05)
        self.offsets: dict[tuple[str, int], itertools.count[int]] = {}
        self.serial = itertools.count()
        self.batches = 0
        self.records = 0
        self.outcomes = {"applied": 0, "invalid": 0, "poison": 0}

    def next_offset(self, topic: str, partition: int) -> int:
        return next(self.offsets.setdefault((topic, partition), itertools.count()))


@pytest.fixture(scope="module")
def harness(postgres: EmbeddedPostgres) -> Iterator[Harness]:
    name = "fuzz_" + uuid.uuid4().hex[:12]
    admin = make_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = libpq_url(postgres.url.replace(f"/{postgres.database}?", f"/{name}?"))
    upgrade(url, vector_dim=16)
    h = Harness(url)
    h.runner.run(
        [
            RawRecord("interest.items", 0, h.next_offset("interest.items", 0), None, encode(vars_of(i)))
            for i in CATALOG
        ]
    )
    yield h
    print(f"\nprocessor fuzz: {h.records} generated records in {h.batches} batches: {h.outcomes}")
    h.proc.store.engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def vars_of(item: Item) -> dict[str, Any]:
    return {"item_id": item.item_id, "text": item.text}


# One generated record: (topic, partition, value, clean) where `clean` marks a record built
# to be valid with text Postgres can store (it must be applied, never dead-lettered).
@st.composite
def fuzzed_record(draw: st.DrawFn, serial: Iterator[int]) -> tuple[str, int, bytes | None, bool]:
    partition = draw(st.integers(0, 3))
    shape = draw(st.sampled_from(["valid", "valid", "valid", "nasty", "mutated", "bytes", "empty", "topic"]))
    if shape in ("valid", "nasty"):
        kind = draw(st.sampled_from(KINDS))
        rec = draw(valid_record(kind, any_text if shape == "nasty" else clean_text))
        if kind == "item":
            rec["item_id"] = draw(st.sampled_from([c.item_id for c in CATALOG] + ["new-item"]))
        else:
            # Unique per record across examples, so "applied" can be checked by id.
            rec["event_id"] = f"{next(serial)}:{rec['event_id']}"[:128]
            if "item_id" in rec and draw(st.booleans()):
                rec["item_id"] = draw(st.sampled_from([c.item_id for c in CATALOG]))
        return TOPIC_OF[kind], partition, encode(rec), shape == "valid"
    if shape == "mutated":
        kind, rec = draw(mutated_record())
        topic = TOPIC_OF[draw(st.sampled_from([kind, kind, kind, *KINDS]))]
        if isinstance(rec.get("event_id"), str):
            rec["event_id"] = f"{next(serial)}:{rec['event_id']}"[:128]
        return topic, partition, encode(rec), False
    if shape == "bytes":
        return draw(st.sampled_from(list(TOPICS))), partition, draw(st.binary(max_size=64)), False
    if shape == "empty":
        return draw(st.sampled_from(list(TOPICS))), partition, None, False
    return "interest.unknown", partition, encode(draw(valid_record())), False


def expected(topic: str, value: bytes | None) -> Event | Item | None:
    """What the validator makes of a record (None: it must be dead-lettered)."""
    if topic not in TOPICS or value is None:
        return None
    try:
        return parse_topic_record(value, TOPICS[topic])
    except InvalidRecord:
        return None


def storable(value: str) -> bool:
    return "\x00" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)


SERIAL = itertools.count()


@fuzz_settings(EXAMPLES)
@given(st.lists(fuzzed_record(SERIAL), min_size=1, max_size=12), st.data())
def test_every_record_ends_applied_or_dead_lettered(
    harness: Harness, drawn: list[Any], data: st.DataObject
) -> None:
    h = harness
    # Producer retries: some records twice in the same batch (same offset order, later offset).
    drawn = drawn + data.draw(st.lists(st.sampled_from(drawn), max_size=2))
    batch = [
        RawRecord(topic, p, h.next_offset(topic, p), b"k", value, timestamp_ms=1_700_000_000_000)
        for topic, p, value, _ in drawn
    ]
    clean = {(r.topic, r.partition, r.offset): c for r, (*_, c) in zip(batch, drawn, strict=True)}
    before = len(h.sink)
    h.runner.run(batch)  # must not raise
    h.batches += 1
    h.records += len(batch)

    dead = {(d["topic"], d["partition"], d["offset"]): d["reason"] for d in h.sink[before:]}
    assert all(isinstance(reason, str) and reason.strip() for reason in dead.values()), dead
    store = h.proc.store
    events = {r: e for r in batch if isinstance(e := expected(r.topic, r.value), Event)}
    # An id Postgres cannot hold cannot have been applied (and cannot be looked up either).
    applied = store.applied_event_ids([e.event_id for e in events.values() if storable(e.event_id)])
    with store.engine.connect() as conn:
        items = set(conn.execute(text("SELECT item_id FROM items")).scalars())
    for r in batch:
        where = (r.topic, r.partition, r.offset)
        parsed = expected(r.topic, r.value)
        if parsed is None:
            assert where in dead, f"invalid record not dead-lettered: {r}"
            h.outcomes["invalid"] += 1
            continue
        if where in dead:
            # Valid by the contract but refused by Postgres: a poison record, isolated alone.
            assert dead[where].startswith("processing failed"), (r, dead[where])
            assert not clean[where], f"a valid, storable record was dead-lettered: {r} ({dead[where]})"
            if isinstance(parsed, Event):
                assert parsed.event_id not in applied, f"applied and dead-lettered: {r}"
            h.outcomes["poison"] += 1
            continue
        h.outcomes["applied"] += 1
        if isinstance(parsed, Event):
            assert parsed.event_id in applied, f"valid event neither applied nor dead-lettered: {r}"
        else:
            assert parsed.item_id in items, f"valid item neither stored nor dead-lettered: {r}"

    # Exactly once: every applied event counted in exactly one user's n_events.
    with store.engine.connect() as conn:
        n_applied = conn.execute(text("SELECT count(*) FROM applied_events")).scalar_one()
        n_counted = conn.execute(
            text("SELECT coalesce(sum(n_events), 0) FROM user_interests_current")
        ).scalar_one()
        wrong = conn.execute(
            text(
                "SELECT c.user_id FROM user_interests_current c LEFT JOIN "
                "(SELECT user_id, count(*) AS n FROM applied_events GROUP BY user_id) a USING (user_id) "
                "WHERE c.n_events <> coalesce(a.n, 0)"
            )
        ).all()
    assert n_applied == n_counted and not wrong, (n_applied, n_counted, wrong[:5])
    # The batch's offsets are committed (invalid and poison records are moved past, not retried).
    stored = store.stored_offsets()
    for r in batch:
        if r.topic in TOPICS:
            assert stored[(r.topic, r.partition)] > r.offset
