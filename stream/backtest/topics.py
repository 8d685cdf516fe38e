"""A range of the Kafka topics as a backtest source (`stream.topics` reads them).

The catalog topic is always read whole: ranking needs the full catalog. Records
are validated exactly as the worker validates them; invalid ones become
`Rejected` entries with their topic/partition/offset.
"""

from __future__ import annotations

from stream.backtest.data import BacktestData, assemble
from stream.broker import make_consumer
from stream.schema import Limits
from stream.settings import Settings
from stream.sources import SourceError
from stream.topics import TopicRange, read_range, topic_partitions

__all__ = ["TopicRange", "load_topic_range"]


def load_topic_range(
    bootstrap: str,
    settings: Settings,
    rng: TopicRange,
    limits: Limits,
    timeout_s: float = 120.0,
) -> BacktestData:
    """The whole catalog topic plus the event topics' records within `rng`."""
    kinds = {**settings.event_topics, settings.topic_items: "item"}
    consumer = make_consumer(bootstrap, consumer_timeout_ms=1000)
    try:
        available = consumer.topics()
        if settings.topic_items not in available:
            raise SourceError(f"no catalog topic {settings.topic_items!r} on {bootstrap}")
        item_tps = topic_partitions(consumer, settings.topic_items)
        event_tps = [
            tp for t in settings.event_topics if t in available for tp in topic_partitions(consumer, t)
        ]
        bounds: dict[str, list[int]] = {}
        parsed = [
            *read_range(consumer, item_tps, TopicRange(), kinds, limits, timeout_s, {}),
            *read_range(consumer, event_tps, rng, kinds, limits, timeout_s, bounds),
        ]
    finally:
        consumer.close()
    source = {
        "kind": "topics",
        "bootstrap": bootstrap,
        "range": rng.describe(),
        "partitions": dict(sorted(bounds.items())),
    }
    return assemble(parsed, source)
