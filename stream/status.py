"""`istream status`: lag and freshness per partition, from the broker and Postgres' offsets.

- lag: records on the topic not yet committed to Postgres;
- freshness: for the last committed record, broker timestamp -> commit in Postgres;
- waiting: age of the oldest record not yet committed (0 when caught up) — every
  vector in SQL reflects all events older than this;
- workers: whether each worker whose metrics it can reach is failing systemically
  (docs/stream.md, "Poison or systemic"): its offsets then stand still on purpose.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from storage.repository import VectorStore
from storage.schema import ConsumedOffset, ModelVersion
from stream.broker import high_watermarks


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    topic: str
    partition: int
    end_offset: int
    committed: int
    last_commit: datetime | None
    freshness_s: float | None
    waiting_s: float

    @property
    def lag(self) -> int:
        return max(self.end_offset - self.committed, 0)


def _record_ts(consumer: KafkaConsumer, tp: TopicPartition, offset: int) -> float | None:
    """Broker timestamp (epoch s) of the record at `offset`, or None."""
    consumer.seek(tp, offset)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for msgs in consumer.poll(timeout_ms=500, max_records=1).values():
            for m in msgs:
                return m.timestamp / 1000.0 if m.timestamp and m.timestamp > 0 else None
    return None


def partition_status(bootstrap: str, store: VectorStore, topics: Sequence[str]) -> list[PartitionStatus]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(
                ConsumedOffset.topic,
                ConsumedOffset.partition,
                ConsumedOffset.next_offset,
                ConsumedOffset.updated_at,
            ).where(ConsumedOffset.group_id == store.group_id)
        ).all()
    stored = {(t, p): (o, u) for t, p, o, u in rows}
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=15000)
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        if not tps:
            return []
        ends = high_watermarks(consumer, tps)
        consumer.assign(tps)
        now = time.time()
        out: list[PartitionStatus] = []
        for tp in tps:
            committed, updated = stored.get((tp.topic, tp.partition), (0, None))
            end = int(ends.get(tp, 0))
            freshness = None
            if committed > 0 and updated is not None:
                produced = _record_ts(consumer, tp, committed - 1)
                if produced is not None:
                    freshness = max(updated.timestamp() - produced, 0.0)
            waiting = 0.0
            if end > committed:
                oldest = _record_ts(consumer, tp, committed)
                waiting = max(now - oldest, 0.0) if oldest is not None else 0.0
            out.append(PartitionStatus(tp.topic, tp.partition, end, committed, updated, freshness, waiting))
        return out
    finally:
        consumer.close()


def privacy_line(store: VectorStore) -> str | None:
    """The DP budget as of the newest published version that records one (docs/privacy.md)."""
    with store.engine.connect() as conn:
        row = conn.execute(
            select(ModelVersion.model_version, ModelVersion.metrics, ModelVersion.config)
            .where(ModelVersion.metrics.has_key("dp_epsilon"))
            .order_by(ModelVersion.created_at.desc(), ModelVersion.model_version.desc())
            .limit(1)
        ).first()
    if row is None:
        return None
    version, metrics, config = row
    target = (config or {}).get("dp_epsilon")
    budget = f" of a budget of {float(target):g}" if target is not None else ""
    state = "; budget spent, shared parameters frozen" if metrics.get("dp_budget_exhausted") else ""
    return (
        f"differential privacy: epsilon {float(metrics['dp_epsilon']):.3f}{budget} spent "
        f"(delta {float(metrics['dp_delta']):.2e}) as of {version}{state}"
    )


def format_status(rows: Sequence[PartitionStatus]) -> str:
    header = (
        f"{'topic':<24} {'part':>4} {'end':>9} {'committed':>9} {'lag':>8} {'fresh_s':>8} "
        f"{'waiting_s':>9}  last commit"
    )
    lines = [header]
    for r in rows:
        fresh = f"{r.freshness_s:.2f}" if r.freshness_s is not None else "-"
        last = r.last_commit.isoformat(timespec="seconds") if r.last_commit else "never"
        lines.append(
            f"{r.topic:<24} {r.partition:>4} {r.end_offset:>9} {r.committed:>9} {r.lag:>8} {fresh:>8} "
            f"{r.waiting_s:>9.1f}  {last}"
        )
    total = sum(r.lag for r in rows)
    worst = max((r.waiting_s for r in rows), default=0.0)
    lines.append(f"total lag {total} records; oldest uncommitted record waits {worst:.1f}s")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    url: str
    reachable: bool
    failing: bool = False
    failures: int = 0  # systemic attempts failed since the worker started
    error: str | None = None  # the last systemic error, or why the worker could not be read


def worker_health(url: str, timeout_s: float = 2.0) -> WorkerHealth:
    """A worker's systemic-failure state, read from its Prometheus endpoint."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = resp.read().decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return WorkerHealth(url, reachable=False, error=str(getattr(exc, "reason", exc)))
    failing, failures, error = False, 0, None
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "istream_systemic_failing":
                failing = sample.value >= 1
            elif sample.name == "istream_systemic_failures_total":
                failures += int(sample.value)
            elif sample.name == "istream_systemic_error_info":
                error = sample.labels.get("error")
    return WorkerHealth(url, reachable=True, failing=failing, failures=failures, error=error)


def format_health(rows: Sequence[WorkerHealth]) -> str:
    lines = []
    for h in rows:
        if not h.reachable:
            lines.append(f"worker {h.url}: metrics unreachable ({h.error})")
        elif h.failing:
            lines.append(
                f"worker {h.url}: SYSTEMIC FAILURE, {h.failures} failed attempts, offsets held: {h.error}"
            )
        elif h.failures:
            lines.append(f"worker {h.url}: ok (recovered from {h.failures} systemic failures: {h.error})")
        else:
            lines.append(f"worker {h.url}: ok")
    return "\n".join(lines)
