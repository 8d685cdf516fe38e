"""The backtest driver: predict-then-learn, slices, exclusion, reproducibility, interest switch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from models.baselines import BiasedMFModel, PopularityModel
from models.core import BatchResult
from models.decayed_mean import DecayedMeanModel
from models.events import Event
from models.registry import build_model
from stream.backtest import BacktestConfig, from_records, run_backtest
from stream.backtest.wrappers import FrozenAfter
from stream.runtime import model_options
from stream.settings import Settings
from stream.sources import synthetic_log
from tests.fakes import HashEncoder


def _items(n: int) -> list[dict]:
    return [{"type": "item", "item_id": f"i{k}", "text": f"item number {k}"} for k in range(n)]


def _click(n: int, user: str, item: str, minute: int) -> dict:
    return {
        "type": "click",
        "event_id": f"e{n}",
        "user_id": user,
        "item_id": item,
        "ts": 1_700_000_000_000 + minute * 60_000,
    }


class SpyModel(PopularityModel):
    """Records the order of predict and learn calls."""

    def __init__(self) -> None:
        super().__init__(half_life_s=86400.0)
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def predict_many(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(("predict", tuple(user_ids)))
        return super().predict_many(user_ids)

    def learn(self, events: Sequence[Event]) -> BatchResult:
        self.calls.append(("learn", tuple(e.event_id for e in events)))
        return super().learn(events)


class SeenFirst(PopularityModel):
    """Scores the items a user already had highest: exclusion must neutralise that."""

    def __init__(self) -> None:
        super().__init__(half_life_s=86400.0)
        self.had: dict[str, set[str]] = {}

    def predict_many(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.item_ids()
        mat = np.array([[1.0 if i in self.had.get(u, ()) else 0.0 for i in ids] for u in user_ids])
        return mat, np.ones(len(user_ids), dtype=bool)

    def learn(self, events: Sequence[Event]) -> BatchResult:
        for e in events:
            if e.target_item:
                self.had.setdefault(e.user_id, set()).add(e.target_item)
        return super().learn(events)


def test_every_event_of_a_batch_is_scored_before_any_is_learned() -> None:
    records = [*_items(5)] + [_click(n, f"u{n % 3}", f"i{n % 5}", n) for n in range(10)]
    spy = SpyModel()
    result = run_backtest({"spy": spy}, from_records(records), BacktestConfig(batch_size=4, progress=False))
    kinds = [c[0] for c in spy.calls]
    assert kinds == ["predict", "learn", "predict", "learn", "predict", "learn"]
    assert spy.calls[1][1] == ("e0", "e1", "e2", "e3")
    assert result.n_events == 10


def test_slices_cold_start_and_seen_item_exclusion() -> None:
    records = [
        *_items(30),
        _click(0, "a", "i1", 0),  # cold: a's first event
        _click(1, "a", "i2", 1),  # warm, same batch as the first: not yet learned
        _click(2, "b", "i3", 2),  # cold
        _click(3, "a", "i3", 3),  # warm and learned (a has events in the earlier batch)
        _click(4, "a", "i1", 4),  # a repeat of i1: not ranked
    ]
    model = SeenFirst()
    res = run_backtest({"m": model}, from_records(records), BacktestConfig(batch_size=3, progress=False))
    assert res.counts["positives"] == 5
    assert res.counts["repeats"] == 1
    assert res.cold.tolist() == [True, False, True, False]
    assert res.learned.tolist() == [False, False, False, True]
    # For the 4th event the model ranks a's seen items i1, i2 first; both are excluded, so the
    # target ties with every other candidate: 30 items - 2 seen = 28 candidates.
    assert res.greater["m"][3] == 0
    assert res.ties["m"][3] == 27
    totals = res.totals("warm")["m"]
    assert totals["n"] == 2
    assert res.totals("kind:click")["m"]["n"] == 2
    assert res.totals("kind:rating")["m"]["n"] == 0


def test_invalid_and_duplicate_records_are_reported_not_dropped() -> None:
    records = [
        *_items(3),
        _click(0, "a", "i1", 0),
        _click(0, "a", "i1", 0),
        {"type": "click", "user_id": "a"},
    ]
    data = from_records(records)
    assert data.duplicates == 1
    assert len(data.events) == 1
    assert [r.reason for r in data.rejected] == ["missing required field 'event_id'"]


def test_events_are_replayed_in_event_time_order() -> None:
    records = [*_items(3), _click(0, "a", "i1", 5), _click(1, "a", "i2", 1), _click(2, "b", "i0", 3)]
    assert [e.event_id for e in from_records(records).events] == ["e1", "e2", "e0"]


def _baselines(seed: int) -> dict:
    return {
        "popularity": PopularityModel(half_life_days=0.1),
        "biased_mf": BiasedMFModel(seed=seed),
        "decayed_mean": DecayedMeanModel(HashEncoder(16), half_life_s=3600.0),
    }


def test_same_seed_same_numbers() -> None:
    data = from_records(synthetic_log(n_users=20, n_events=600, seed=3))
    cfg = BacktestConfig(batch_size=50, progress=False)
    a = run_backtest(_baselines(7), data, cfg)
    b = run_backtest(_baselines(7), data, cfg)
    for m in a.models:
        np.testing.assert_array_equal(a.greater[m], b.greater[m])
        np.testing.assert_array_equal(a.ties[m], b.ties[m])
    assert a.totals() == b.totals()
    assert a.rating_totals() == b.rating_totals()
    c = run_backtest(_baselines(8), data, cfg)
    assert not np.array_equal(a.greater["biased_mf"], c.greater["biased_mf"])  # the seed matters


def test_tail_slice_is_the_last_fraction_of_events() -> None:
    data = from_records(synthetic_log(n_users=10, n_events=400, seed=1))
    res = run_backtest(
        {"p": PopularityModel()}, data, BacktestConfig(batch_size=40, tail_fraction=0.25, progress=False)
    )
    assert res.tail_start == 300
    tail = res.mask("tail")
    assert tail.any()
    assert (res.position[tail] >= 300).all()
    assert not (res.position[res.mask("warm") & ~tail] >= 300).any()


@pytest.mark.parametrize("spec", ["decayed_mean", pytest.param("adapter", marks=pytest.mark.slow)])
def test_rolling_recall_recovers_after_an_interest_switch_only_with_updates(spec: str) -> None:
    """Users switch topics halfway; the dynamic model follows, a frozen copy does not."""
    records = synthetic_log(n_users=30, n_events=3000, switch_at=0.5, seed=0)
    data = from_records(records)
    switch_ts = data.events[1500].ts
    enc = HashEncoder(64)
    # Events are a minute apart: a user's interest should fade within hours, not days.
    settings = Settings(model=spec, half_life_s=3 * 3600.0, seed=0, device="cpu")
    models = {
        "dynamic": build_model(spec, enc, **model_options(settings)),
        "frozen": FrozenAfter(build_model(spec, enc, **model_options(settings)), frozen_at=switch_ts),
    }
    res = run_backtest(models, data, BacktestConfig(batch_size=50, windows=20, progress=False))
    roll = res.rolling()
    starts = np.asarray(roll["start"])
    curve = {m: np.asarray(roll["models"][m]["recall@10"], dtype=float) for m in models}
    before = starts + roll["window_s"] < switch_ts
    settled = starts > switch_ts + 0.25 * (starts[-1] - switch_ts)  # after a short adaptation period
    # Same model, same state before the switch.
    np.testing.assert_allclose(curve["dynamic"][before], curve["frozen"][before])
    pre = curve["dynamic"][before].mean()
    assert pre > 0.5  # the topic is learnable (random would be 10/120)
    assert curve["dynamic"][settled].mean() > 0.8 * pre  # recovered
    assert curve["frozen"][settled].mean() < 0.5 * pre  # stuck on the old topic


def test_strategies_are_compared_with_the_best_baseline_per_metric() -> None:
    from stream.backtest.report import markdown, versus_baselines

    data = from_records(synthetic_log(n_users=10, n_events=400, seed=6))
    models = {**_baselines(0), "mine": DecayedMeanModel(HashEncoder(32), half_life_s=600.0)}
    res = run_backtest(models, data, BacktestConfig(batch_size=50, progress=False))
    rel = versus_baselines(res)
    assert set(rel) == {"mine", "popularity", "biased_mf", "decayed_mean"}
    assert max(rel[b]["ndcg@10"] for b in ("popularity", "biased_mf", "decayed_mean")) == pytest.approx(1.0)
    totals = res.totals()
    for k, v in rel["mine"].items():
        best = max(totals[b][k] for b in ("popularity", "biased_mf", "decayed_mean"))
        assert v == pytest.approx(totals["mine"][k] / best)
    assert "Relative to the best baseline" in markdown(res)
