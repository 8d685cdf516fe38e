"""Send records to their topics (key = user_id, or item_id for the catalog)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaProducer

from stream.records import RawRecord, dead_letter, encode_dead_letter
from stream.schema import RECORD_TYPES
from stream.settings import Settings
from stream.sources import LogLine


@dataclass(slots=True)
class ProduceReport:
    sent: dict[str, int] = field(default_factory=dict)  # topic -> count
    dead_lettered: int = 0

    @property
    def total(self) -> int:
        return sum(self.sent.values()) + self.dead_lettered


def route(record: dict[str, Any] | None, settings: Settings) -> tuple[str, bytes | None] | str:
    """(topic, key) for a routable record, or the reason it cannot be routed."""
    if record is None:
        return "line is not a JSON object"
    kind = record.get("type")
    if kind not in RECORD_TYPES:
        return f"unknown or missing type {kind!r}; expected one of {', '.join(RECORD_TYPES)}"
    key_field = "item_id" if kind == "item" else "user_id"
    key = record.get(key_field)
    return settings.topic_for_kind(kind), key.encode("utf-8") if isinstance(key, str) else None


class EventProducer:
    def __init__(self, producer: KafkaProducer, settings: Settings, source: str = "produce") -> None:
        self.producer = producer
        self.settings = settings
        self.source = source
        self.report = ProduceReport()

    def send(self, item: dict[str, Any] | LogLine, lineno: int = 0) -> str:
        """Send one record; returns the topic it went to."""
        if isinstance(item, LogLine):
            record, raw, lineno = item.record, item.raw.encode("utf-8"), item.lineno
        else:
            record, raw = item, json.dumps(item).encode("utf-8")
        routed = route(record, self.settings)
        if isinstance(routed, str):
            # Unroutable input still never vanishes: it goes to the dead-letter topic.
            rec = RawRecord(f"{self.source}:line", 0, lineno, None, raw)
            self.producer.send(
                self.settings.topic_dead_letter, value=encode_dead_letter(dead_letter(rec, routed))
            )
            self.report.dead_lettered += 1
            return self.settings.topic_dead_letter
        topic, key = routed
        self.producer.send(topic, key=key, value=raw)
        self.report.sent[topic] = self.report.sent.get(topic, 0) + 1
        return topic

    def send_all(
        self, items: Iterable[dict[str, Any] | LogLine], progress: bool = False, total: int | None = None
    ) -> ProduceReport:
        from stream.progress import progress as counter

        with counter(total, "producing", unit="rec", enabled=progress) as bar:
            for item in items:
                self.send(item)
                bar.update(1)
        self.flush()
        return self.report

    def flush(self, timeout: float = 60.0) -> None:
        started = time.monotonic()
        self.producer.flush(timeout=timeout)
        if time.monotonic() - started > timeout:
            raise TimeoutError("the broker did not acknowledge all records in time")
