"""sasrec: trained offline on the events before the tail, frozen, scored on the tail only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.baselines import PopularityModel
from models.core import OfflineFit
from models.events import Event, Item
from models.sasrec import SASRecModel
from stream.backtest import BacktestConfig, from_records, run_backtest
from stream.backtest.report import best_baselines, markdown, versus_baselines

N_ITEMS = 12


def _items() -> list[Item]:
    return [Item(item_id=f"i{k}", text=f"item {k}") for k in range(N_ITEMS)]


def _walks(n_users: int = 40, length: int = 8) -> list[Event]:
    """Every user walks the catalog in order from their own start: i_k is always followed by i_k+1."""
    events = []
    for u in range(n_users):
        for step in range(length):
            item = (u + step) % N_ITEMS
            events.append(
                Event(
                    event_id=f"{u}-{step}",
                    user_id=f"u{u}",
                    ts=float(step * 100 + u),
                    kind="click",
                    item_id=f"i{item}",
                )
            )
    return sorted(events, key=lambda e: e.ts)


def _small(**kw: object) -> SASRecModel:
    opts = {
        "progress": False,
        "dim": 16,
        "max_len": 6,
        "max_epochs": 40,
        "patience": 5,
        "lr": 0.01,
        "dropout": 0.0,
        "seed": 3,
    }
    m = SASRecModel(**{**opts, **kw})  # type: ignore[arg-type]
    m.upsert_items(_items())
    return m


def test_learns_a_sequence_offline_then_stays_frozen() -> None:
    events = _walks()
    m = _small()
    assert isinstance(m, OfflineFit)
    state = torch.get_rng_state()
    report = m.fit_offline(events)
    # The global torch RNG is left as it was: other models' numbers do not depend on this one.
    assert torch.equal(state, torch.get_rng_state())
    assert report["validation_users"] == 40 and report["best_val_ndcg@10"] > 0.5
    assert 1 <= report["best_epoch"] <= report["epochs"] <= 40
    weights = [p.detach().clone() for p in m.net.parameters()]
    m.learn([Event(event_id="x1", user_id="new", ts=1e6, kind="click", item_id="i4")])
    m.learn([Event(event_id="x2", user_id="new", ts=1e6 + 1, kind="click", item_id="i5")])
    scores, known = m.predict_many(["new", "nobody"])
    assert known.tolist() == [True, True]
    unseen = scores[0].copy()
    unseen[[4, 5]] = -np.inf  # the evaluator never ranks what the user had
    assert int(np.argmax(unseen)) == 6  # after i4, i5 comes i6
    # Someone with no item yet is ranked by the training events' popularity.
    np.testing.assert_array_equal(scores[1], m.prior)
    for before, after in zip(weights, m.net.parameters(), strict=True):
        assert torch.equal(before, after)  # learn never trains


def test_same_seed_same_scores() -> None:
    events = _walks(n_users=20)
    a, b = _small(max_epochs=3, dropout=0.2), _small(max_epochs=3, dropout=0.2)
    a.fit_offline(events)
    b.fit_offline(events)
    for m in (a, b):
        m.learn(events)
    np.testing.assert_array_equal(a.predict_many(["u1", "u2"])[0], b.predict_many(["u1", "u2"])[0])


def test_backtest_fits_it_on_the_head_and_counts_it_on_the_tail_only() -> None:
    records = [{"type": "item", "item_id": f"i{k}", "text": f"item {k}"} for k in range(N_ITEMS)]
    for e in _walks(n_users=30, length=10):
        records.append(
            {
                "type": "click",
                "event_id": e.event_id,
                "user_id": e.user_id,
                "item_id": e.item_id,
                "ts": int(e.ts * 1000),
            }
        )
    data = from_records(records)
    models = {"popularity": PopularityModel(), "sasrec": _small(max_epochs=10)}
    res = run_backtest(models, data, BacktestConfig(batch_size=20, progress=False))
    assert res.trained_until == {"sasrec": res.tail_start}
    assert res.offline_fits["sasrec"]["events"] == res.tail_start
    assert res.seconds["sasrec"]["fit_s"] > 0
    assert not res.comparable("sasrec", "warm") and res.comparable("sasrec", "tail")
    assert res.comparable("popularity", "warm")
    # Off the tail it is never the best baseline, nor compared; on the tail it is both.
    assert all(v["model"] == "popularity" for v in best_baselines(res, "warm").values())
    assert "sasrec" not in versus_baselines(res, "warm")
    assert "sasrec" in versus_baselines(res, "tail")
    assert res.totals("tail")["sasrec"]["ndcg@10"] > res.totals("tail")["popularity"]["ndcg@10"]
    assert ")†" in markdown(res)


def test_a_fit_in_a_child_process_is_the_fit_in_this_one() -> None:
    """The backtest fits SASRec in a child process while the other models replay: the same
    seeded fit, the same ranks, and the caller's own model object ends up fitted."""
    records = [{"type": "item", "item_id": f"i{k}", "text": f"item {k}"} for k in range(N_ITEMS)]
    records += [
        {
            "type": "click",
            "event_id": e.event_id,
            "user_id": e.user_id,
            "item_id": e.item_id,
            "ts": int(e.ts * 1000),
        }
        for e in _walks(n_users=30, length=10)
    ]
    data = from_records(records)
    runs = {}
    for background in (True, False):
        models = {"popularity": PopularityModel(), "sasrec": _small(max_epochs=6)}
        cfg = BacktestConfig(batch_size=20, progress=False, fit_in_background=background)
        runs[background] = run_backtest(models, data, cfg)
        assert models["sasrec"].net is not None
    a, b = runs[True], runs[False]
    for name in ("popularity", "sasrec"):
        np.testing.assert_array_equal(a.greater[name], b.greater[name])
        np.testing.assert_array_equal(a.ties[name], b.ties[name])
    assert a.offline_fits["sasrec"]["history"] == b.offline_fits["sasrec"]["history"]


class _FitThatFails(PopularityModel):
    def fit_offline(self, events: list[Event]) -> dict[str, float]:
        raise ValueError("no fit today")


def test_a_fit_that_fails_in_the_child_fails_the_backtest_with_its_reason() -> None:
    records = [{"type": "item", "item_id": f"i{k}", "text": f"item {k}"} for k in range(N_ITEMS)]
    records += [
        {"type": "click", "event_id": f"e{k}", "user_id": f"u{k % 5}", "item_id": f"i{k % N_ITEMS}", "ts": k}
        for k in range(50)
    ]
    models = {"popularity": PopularityModel(), "broken": _FitThatFails()}
    with pytest.raises(RuntimeError, match="ValueError: no fit today"):
        run_backtest(models, from_records(records), BacktestConfig(batch_size=10, progress=False))


def test_sampled_softmax_for_big_catalogs_learns_too() -> None:
    m = _small(full_softmax_max_items=5, negatives=6)
    report = m.fit_offline(_walks())
    assert "sampled" in m.config()["loss"]
    assert report["best_val_ndcg@10"] > 0.3
