"""Reading a range of the Kafka topics, validated exactly as the worker validates records.

A range is given per partition by offsets (`from_offset` inclusive, `to_offset`
exclusive, the same numbers for every partition) or by record timestamps (each
record's own timestamp, scanning from the partition's start). The end is fixed
when the read starts, so a read of a live topic terminates. Used by the worker
(the catalog before its first batch) and by backtests of topic ranges
(`stream.backtest.topics`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from models.events import Item
from stream.broker import make_consumer
from stream.schema import InvalidRecord, Limits, Parsed, Rejected, parse_topic_record
from stream.settings import Settings
from stream.sources import SourceError


def topic_partitions(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]


@dataclass(frozen=True, slots=True)
class TopicRange:
    from_offset: int | None = None
    to_offset: int | None = None  # exclusive
    from_ts: float | None = None  # epoch seconds, record timestamp
    to_ts: float | None = None  # exclusive

    def __post_init__(self) -> None:
        if (self.from_offset is not None or self.to_offset is not None) and (
            self.from_ts is not None or self.to_ts is not None
        ):
            raise ValueError("give the topic range by offsets or by timestamps, not both")
        for name in ("from_offset", "to_offset"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.from_offset is not None and self.to_offset is not None and self.to_offset < self.from_offset:
            raise ValueError("to_offset is before from_offset")
        if self.from_ts is not None and self.to_ts is not None and self.to_ts < self.from_ts:
            raise ValueError("to_ts is before from_ts")

    def describe(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("from_offset", "to_offset", "from_ts", "to_ts")}


def read_range(
    consumer: KafkaConsumer,
    tps: list[TopicPartition],
    rng: TopicRange,
    kinds: dict[str, str],
    limits: Limits,
    timeout_s: float,
    bounds: dict[str, list[int]],
) -> Iterator[Parsed]:
    """Records of `tps` within `rng`; fills `bounds` with each partition's [start, stop)."""
    if not tps:
        return
    begin = consumer.beginning_offsets(tps)
    listed_end = consumer.end_offsets(tps)
    start = {tp: max(begin[tp], rng.from_offset or 0) for tp in tps}
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, start[tp])
    # The end is fixed at the first high watermark a fetch reports (so a live topic still ends).
    # ListOffsets alone is not trusted: seen here, Tansu answered 'latest' with 1 for a partition
    # holding 57 records (one producer batch).
    stop: dict[TopicPartition, int] = {}
    todo = set(tps)
    deadline = time.monotonic() + timeout_s
    lo_ms = None if rng.from_ts is None else rng.from_ts * 1000
    hi_ms = None if rng.to_ts is None else rng.to_ts * 1000
    while todo:
        if time.monotonic() > deadline:
            left = ", ".join(sorted(f"{tp.topic}/{tp.partition}" for tp in todo))
            raise SourceError(f"topic range not fully read after {timeout_s:.0f}s (still waiting on {left})")
        batch = consumer.poll(timeout_ms=300, max_records=5000)
        for tp in todo:
            if tp not in stop and consumer.highwater(tp) is not None:
                end = max(listed_end[tp], consumer.highwater(tp) or 0)
                stop[tp] = end if rng.to_offset is None else min(end, rng.to_offset)
        for tp, records in batch.items():
            for rec in records:
                if tp not in stop or rec.offset >= stop[tp]:
                    break
                # Time ranges filter on each record's own timestamp: exact, whatever the broker's
                # ListOffsets-by-time would say.
                if (lo_ms is not None and rec.timestamp < lo_ms) or (
                    hi_ms is not None and rec.timestamp >= hi_ms
                ):
                    continue
                where = f"{tp.topic}/{tp.partition}@{rec.offset}"
                if rec.value is None:
                    yield Rejected(where, "empty record (no value)")
                    continue
                try:
                    yield parse_topic_record(rec.value, kinds[tp.topic], limits)
                except InvalidRecord as exc:
                    yield Rejected(where, exc.reason)
        for tp in list(todo):
            if tp in stop and consumer.position(tp) >= stop[tp]:
                todo.discard(tp)
                consumer.pause(tp)
                bounds[f"{tp.topic}/{tp.partition}"] = [start[tp], max(start[tp], stop[tp])]


def read_catalog(
    bootstrap: str, settings: Settings, limits: Limits, timeout_s: float
) -> tuple[list[Item], bool]:
    """The catalog topic, whole, up to the end it has now: its valid items, and whether it was
    read to the end within `timeout_s` (False: the items read so far). Invalid records are left
    to the consumer that dead-letters them."""
    kinds = {settings.topic_items: "item"}
    items: list[Item] = []
    consumer = make_consumer(bootstrap, consumer_timeout_ms=1000)
    try:
        tps = topic_partitions(consumer, settings.topic_items)
        for parsed in read_range(consumer, tps, TopicRange(), kinds, limits, timeout_s, {}):
            if isinstance(parsed, Item):
                items.append(parsed)
    except SourceError:
        return items, False
    finally:
        consumer.close()
    return items, True
