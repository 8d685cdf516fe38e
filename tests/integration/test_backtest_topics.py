"""A topic range as a backtest source, against the real embedded broker."""

from __future__ import annotations

import sys
import time

import pytest

from models.baselines import PopularityModel
from stream.backtest import BacktestConfig, from_records, run_backtest
from stream.backtest.topics import TopicRange, load_topic_range
from stream.broker import EmbeddedBroker, ensure_topics, make_producer
from stream.cli import main
from stream.producer import EventProducer
from stream.runtime import limits
from stream.settings import Settings, get_settings
from stream.sources import synthetic_log

pytestmark = pytest.mark.integration


def _produce(broker: EmbeddedBroker, settings: Settings, records: list[dict]) -> None:
    prod = EventProducer(make_producer(broker.bootstrap), settings)
    prod.send_all(records)
    prod.producer.close()


def test_topic_range_by_offsets_and_by_timestamps(broker: EmbeddedBroker) -> None:
    s = Settings(partitions=2)
    ensure_topics(broker.bootstrap, s.all_topics, s.partitions, compacted=[s.topic_items])
    log = synthetic_log(n_users=8, n_events=120, seed=5)
    items = [r for r in log if r["type"] == "item"]
    events = [r for r in log if r["type"] != "item"]
    bad = {"type": "click", "event_id": "bad-1", "user_id": "user-1", "ts": "yesterday", "item_id": "x"}
    _produce(broker, s, [*items, *events[:60], bad])
    time.sleep(1.1)  # record timestamps are milliseconds of the producer's clock
    cut = time.time()
    time.sleep(0.1)
    _produce(broker, s, events[60:])

    whole = load_topic_range(broker.bootstrap, s, TopicRange(), limits(s))
    assert len(whole.items) == len(items)
    assert {e.event_id for e in whole.events} == {r["event_id"] for r in events}
    assert [r.reason for r in whole.rejected] == ["ts 'yesterday' is not an RFC 3339 date-time"]
    assert whole.rejected[0].where.startswith(s.topic_clicks + "/")
    # Replayed in event-time order whatever the partition layout.
    assert [e.ts for e in whole.events] == sorted(e.ts for e in whole.events)

    later = load_topic_range(broker.bootstrap, s, TopicRange(from_ts=cut), limits(s))
    assert {e.event_id for e in later.events} == {r["event_id"] for r in events[60:]}
    assert len(later.items) == len(items)  # the catalog is always read whole
    earlier = load_topic_range(broker.bootstrap, s, TopicRange(to_ts=cut), limits(s))
    assert {e.event_id for e in earlier.events} == {r["event_id"] for r in events[:60]}

    first = load_topic_range(broker.bootstrap, s, TopicRange(to_offset=5), limits(s))
    # Offsets are per partition: at most 5 records from each partition of each event topic.
    assert 0 < len(first.events) + len(first.rejected) <= 5 * s.partitions * 3
    rest = load_topic_range(broker.bootstrap, s, TopicRange(from_offset=5), limits(s))
    assert {e.event_id for e in first.events} | {e.event_id for e in rest.events} == {
        r["event_id"] for r in events
    }
    assert not {e.event_id for e in first.events} & {e.event_id for e in rest.events}

    # The topic source and the log it came from give the same backtest.
    cfg = BacktestConfig(batch_size=20, progress=False)
    a = run_backtest({"p": PopularityModel()}, whole, cfg)
    b = run_backtest({"p": PopularityModel()}, from_records([*items, *events]), cfg)
    assert a.totals() == b.totals()


def test_cli_backtests_a_topic_range(
    broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    s = Settings(partitions=1)
    ensure_topics(broker.bootstrap, s.all_topics, s.partitions, compacted=[s.topic_items])
    _produce(broker, s, synthetic_log(n_users=4, n_events=100, seed=2))
    monkeypatch.setenv("ISTREAM_KAFKA_BOOTSTRAP", broker.bootstrap)
    monkeypatch.setenv("ISTREAM_PARTITIONS", "1")
    get_settings.cache_clear()
    argv = ["istream", "backtest", "--topics", "--from-offset", "10", "--models", "popularity"]
    monkeypatch.setattr(sys, "argv", [*argv, "--no-report", "--quiet"])
    try:
        main()
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr().out
    assert "| popularity |" in out
    # Offsets 0-9 of each event topic are skipped: fewer than all 100 events are replayed.
    n_events = int(out.split(" events in ")[0].rsplit("\n", 1)[-1])
    assert 60 < n_events < 100
