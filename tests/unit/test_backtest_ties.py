"""Tie-aware protocol: no credit for order inside a timestamp tie; the new_item slice; the tail cut."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.baselines import PopularityModel
from models.core import BatchResult
from models.events import Event
from stream.backtest import BacktestConfig, from_records, run_backtest
from stream.backtest.driver import tail_start_of, tie_groups

T0 = 1_700_000_000_000


def _items(n: int) -> list[dict]:
    return [{"type": "item", "item_id": f"i{k}", "text": f"item {k}"} for k in range(n)]


def _click(n: int, user: str, item: str, month: int) -> dict:
    return {
        "type": "click",
        "event_id": f"c{n}",
        "user_id": user,
        "item_id": item,
        "ts": T0 + month * 86_400_000,
    }


class NextInLine(PopularityModel):
    """Cheats from in-tie order: scores highest the item after the last one it learned for a user.

    The log below has each user click i0, i1, i2, ... in order inside one tie, so with the old
    batch-by-batch protocol (batch size 1) this model would rank every target first.
    """

    def __init__(self) -> None:
        super().__init__(half_life_s=86400.0)
        self.last: dict[str, int] = {}
        self.calls: list[tuple[str, int]] = []

    def predict_many(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(("predict", len(user_ids)))
        mat = np.zeros((len(user_ids), len(self.item_ids())))
        for row, u in enumerate(user_ids):
            if u in self.last:
                mat[row, self.catalog.index[f"i{self.last[u] + 1}"]] = 1.0
        return mat, np.ones(len(user_ids), dtype=bool)

    def learn(self, events: Sequence[Event]) -> BatchResult:
        self.calls.append(("learn", len(events)))
        for e in events:
            assert e.item_id is not None
            self.last[e.user_id] = int(e.item_id[1:])
        return super().learn(events)


def _tied_log() -> list[dict]:
    # Month 0: user a clicks i0; month 1: a clicks i1..i5 (a tie); month 2: a clicks i6.
    clicks = [_click(0, "a", "i0", 0)]
    clicks += [_click(k, "a", f"i{k}", 1) for k in range(1, 6)]
    clicks.append(_click(6, "a", "i6", 2))
    return [*_items(20), *clicks]


def test_a_model_that_cheats_from_in_tie_order_gets_no_credit() -> None:
    model = NextInLine()
    res = run_backtest({"m": model}, from_records(_tied_log()), BacktestConfig(batch_size=1, progress=False))
    assert res.counts["ranked"] == 7 and res.cold.tolist() == [True] + [False] * 6
    greater, ties = res.greater["m"], res.ties["m"]
    # i1: the model learned i0 one month earlier, so "i1 next" is a fair guess: rank 1.
    assert greater[1] == 0 and ties[1] == 0
    # i2..i5: predicted before any of the tie is learned, so the model still says i1, which is
    # excluded (another target of the same tie): the target ties with every candidate.
    # Candidates: 20 items - i0 (before the tie) - the 4 other targets of the tie = 15.
    for k in range(2, 6):
        assert greater[k] == 0 and ties[k] == 14, k
    # i6: the whole tie has been learned, i5 was learned last: rank 1 again.
    assert greater[6] == 0 and ties[6] == 0
    # One prediction for the whole tie, then its events are learned one micro-batch at a time.
    assert model.calls == [
        ("predict", 1),
        ("learn", 1),
        ("predict", 1),
        *[("learn", 1)] * 5,
        ("predict", 1),
        ("learn", 1),
    ]


def test_exclusion_does_not_depend_on_order_inside_a_tie() -> None:
    log = _tied_log()
    reordered = log[:21] + list(reversed(log[21:26])) + log[26:]
    a = run_backtest(
        {"p": PopularityModel()}, from_records(log), BacktestConfig(batch_size=2, progress=False)
    )
    b = run_backtest(
        {"p": PopularityModel()}, from_records(reordered), BacktestConfig(batch_size=2, progress=False)
    )
    # The same positives, each with the same candidates, whatever the order inside the tie.
    assert sorted(a.ties["p"].tolist()) == sorted(b.ties["p"].tolist())
    assert a.totals() == b.totals()


def test_a_click_and_a_search_for_one_item_in_one_tie_are_one_positive() -> None:
    records = [
        *_items(10),
        _click(0, "a", "i0", 0),
        _click(1, "a", "i1", 1),
        {
            "type": "search",
            "event_id": "s1",
            "user_id": "a",
            "query": "one",
            "clicked_item_id": "i1",
            "ts": T0 + 86_400_000,
        },
        {
            "type": "search",
            "event_id": "s2",
            "user_id": "a",
            "query": "one",
            "clicked_item_id": "i1",
            "ts": T0 + 2 * 86_400_000,
        },
    ]
    res = run_backtest(
        {"p": PopularityModel()}, from_records(records), BacktestConfig(batch_size=1, progress=False)
    )
    assert res.counts["positives"] == 4
    assert res.counts["ranked"] == 2
    assert res.counts["same_tie_repeats"] == 1  # the search of month 1
    assert res.counts["repeats"] == 1  # the search of month 2: a had i1 before


def test_new_item_slice_counts_earlier_events_of_the_item_by_anyone() -> None:
    # i0 is clicked by u0..u6 in months 0..6; u7 clicks i1 (new) and i0 (5+ earlier events) later.
    records = [*_items(5)] + [_click(k, f"u{k}", "i0", k) for k in range(7)]
    records += [_click(10, "u7", "i2", 7), _click(11, "u7", "i1", 8), _click(12, "u7", "i0", 9)]
    res = run_backtest(
        {"p": PopularityModel()}, from_records(records), BacktestConfig(batch_size=3, progress=False)
    )
    assert res.item_events.tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 0, 7]
    new = res.mask("new_item")
    assert new.tolist() == [False] * 7 + [False, True, False]  # u7's first click is cold
    assert res.totals("new_item")["p"]["n"] == 1


def test_tail_starts_on_a_tie_boundary() -> None:
    records = [*_items(5)] + [_click(k, f"u{k}", "i0", k // 4) for k in range(10)]  # ties of 4, 4, 2
    data = from_records(records)
    assert tie_groups(data.events) == ([0, 4, 8], [4, 8, 10])
    assert tail_start_of(data.events, 0.2) == 8  # event 8 opens its tie group
    assert tail_start_of(data.events, 0.5) == 4  # event 5 sits in the group that starts at 4
    assert tail_start_of(data.events, 1.0) == 0
    res = run_backtest(
        {"p": PopularityModel()}, data, BacktestConfig(batch_size=3, tail_fraction=0.5, progress=False)
    )
    assert res.tail_start == 4


def test_a_big_tie_scored_in_pieces_gives_the_same_figures(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import stream.backtest.driver as driver

    records = [*_items(30)] + [_click(k, f"u{k % 7}", f"i{(k * 3) % 30}", k // 25) for k in range(100)]
    cfg = BacktestConfig(batch_size=10, progress=False)
    whole = run_backtest({"p": PopularityModel()}, from_records(records), cfg)
    monkeypatch.setattr(driver, "MAX_PLAN_ROWS", 3)
    pieces = run_backtest({"p": PopularityModel()}, from_records(records), cfg)
    np.testing.assert_array_equal(whole.greater["p"], pieces.greater["p"])
    np.testing.assert_array_equal(whole.ties["p"], pieces.ties["p"])
    np.testing.assert_array_equal(whole.position, pieces.position)
