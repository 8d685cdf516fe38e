"""The records the fault and scale-out tests produce, and what each user should end up with."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field

from stream.settings import Settings
from stream.sources import synthetic_log

Record = tuple[str, bytes | None, bytes]


@dataclass
class Workload:
    catalog: list[Record]
    events: list[Record]  # valid events (some sent twice: same event_id)
    invalid: list[Record]  # break the contract or cannot be stored: must end on the dead-letter topic
    expected: Counter[str] = field(default_factory=Counter)  # user -> valid distinct events

    def chunks(self, n: int) -> list[list[Record]]:
        """The events and the invalid records, interleaved, in n consecutive chunks."""
        rng = random.Random(7)
        mixed = list(self.events)
        for rec in self.invalid:
            mixed.insert(rng.randrange(len(mixed) + 1), rec)
        size = -(-len(mixed) // n)
        return [mixed[i : i + size] for i in range(0, len(mixed), size)]


def build_workload(settings: Settings, n_users: int, n_events: int, seed: int = 1) -> Workload:
    rng = random.Random(seed)
    records = synthetic_log(n_users=n_users, n_events=n_events, seed=seed)
    catalog: list[Record] = []
    events: list[Record] = []
    expected: Counter[str] = Counter()
    for r in records:
        kind = r["type"]
        if kind == "item":
            catalog.append((settings.topic_items, r["item_id"].encode(), json.dumps(r).encode()))
            continue
        rec = (settings.topic_for_kind(kind), r["user_id"].encode(), json.dumps(r).encode())
        events.append(rec)
        expected[r["user_id"]] += 1
        if rng.random() < 0.01:  # a producer retry: the same event twice
            events.append(rec)
    t = settings.topic_ratings
    c = settings.topic_clicks

    def js(**fields: object) -> bytes:
        return json.dumps(fields).encode()

    invalid: list[Record] = [
        (t, b"user-1", js(event_id="bad-rating", user_id="user-1", item_id="x", rating=9, ts=0)),
        (t, b"user-2", js(event_id="bad-missing-user", item_id="x", rating=3, ts=0)),
        (c, b"user-3", b"this is not json"),
        (c, b"user-4", js(event_id="bad-ts", user_id="user-4", item_id="x", ts="yesterday")),
        (c, b"user-5", js(event_id="bad-type", type="rating", user_id="user-5", item_id="x", ts=1)),
        (c, None, b"\xff\xfe not utf-8"),
        # NUL in text, which Postgres refuses: once found by bisection as a poison record,
        # now rejected by the validator with its own reason (a value Postgres rejects that the
        # validator passes is in test_poison_systemic).
        (
            t,
            b"user-6",
            json.dumps(
                {"event_id": "poison-1", "user_id": "user-\u0000", "item_id": "x", "rating": 4, "ts": 1000}
            ).encode(),
        ),
    ]
    return Workload(catalog=catalog, events=events, invalid=invalid, expected=expected)


def dead_letter_ids(values: list[dict[str, object]]) -> list[str]:
    """event_ids (or raw text) of the records on the dead-letter topic."""
    out = []
    for v in values:
        text = v.get("value_text")
        try:
            out.append(str(json.loads(text).get("event_id")) if isinstance(text, str) else "<bytes>")
        except (ValueError, AttributeError):
            out.append(str(text))
    return out
