"""The backtest driver: replay events through `InterestModel`s, predict first, then learn.

Protocol (the README states it; `docs/backtest.md` has the details):

- Events are taken in event-time order and learned in micro-batches of
  `batch_size` events, as the worker would see them.
- **Ties.** Events with the same timestamp form a *tie group*; their order is
  unknown (Last.fm's timestamps are month-level), so no model may profit from
  it. Every event of a tie group is scored before any event of that group is
  learned: the events to score before learning micro-batch k are the tie groups
  that *start* in micro-batch k (a group may run on into later micro-batches,
  which are then learned without new predictions). A stream without ties gets
  exactly the old protocol: every event of a batch is scored before any of it
  is learned.
- A *positive* is a rating at or above `positive_threshold`, a click, or a
  search that led to a click; its true item is the rated/clicked item.
- Each positive is ranked against the whole catalog minus the items its user
  interacted with before its tie group and minus the user's other items in the
  same tie group. A positive whose item the user had before its tie group is a
  repeat and is not ranked; a (user, item) is ranked once per tie group (a
  click and a search for the same item in the same month are one positive).
- A positive whose user has no event before its tie group is *cold start*;
  cold positives are their own slice and the headline totals are over the
  others (*warm*). Warm positives whose user's earlier events are not learned
  yet are scored by a model that has not learned them, as in production; the
  `learned` slice keeps only positives whose user has an event in a micro-batch
  learned before the positive was scored. The `new_item` slice keeps warm
  positives whose item had fewer than `new_item_events` events (any user, any
  kind) before its tie group.
- The tail slice starts at the first event of the tie group that holds the event
  at `1 - tail_fraction` of the stream; models trained offline (`OfflineFit`)
  are fitted on the events before it and count only on slices inside it.
- Rating errors (RMSE/MAE) are over ratings whose user and item both appear in
  earlier batches, for models that predict ratings (`predict_rating`).

Models are scored with one matrix product per batch where they allow it (the
default `predict` is `item_matrix() @ user_vector()`); a model can offer a
faster or different scorer through `predict_many(user_ids) -> (scores, known)`.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.core import BatchResult, BatchScorer, InterestModel, OfflineFit, RatingPredictor
from models.events import Event
from models.metrics import RANKING_METRICS, rank_counts, ranking_metrics, rating_errors
from stream.backtest.data import BacktestData
from stream.backtest.offline import OfflineFits, background_fits_pay
from stream.progress import progress


@dataclass(frozen=True, slots=True)
class BacktestConfig:
    batch_size: int = 100
    positive_threshold: float = 4.0
    window_s: float | None = None  # rolling-curve window in event time; None = span / windows
    windows: int = 40
    tail_fraction: float = 0.2  # totals are also given over this last fraction of events
    new_item_events: int = 5  # the new_item slice: targets whose item had fewer earlier events
    seed: int = 0
    progress: bool = True
    # Offline fits (SASRec) in a child process while the other models replay, where 2+ cores allow.
    fit_in_background: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.window_s is not None and self.window_s <= 0:
            raise ValueError("window_s must be > 0")
        if not 0 < self.tail_fraction <= 1:
            raise ValueError("tail_fraction must be in (0, 1]")
        if self.new_item_events < 1:
            raise ValueError("new_item_events must be >= 1")


# Called after each model learned a batch; the point-in-time writer hooks in here.
LearnHook = Callable[[str, Sequence[Event], BatchResult], None]


@dataclass(slots=True)
class EvalLog:
    """One row per ranked positive: when, which event, which kind, cold or not."""

    ts: list[float] = field(default_factory=list)
    position: list[int] = field(default_factory=list)  # index of the event in the stream
    cold: list[bool] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    learned: list[bool] = field(default_factory=list)
    item_events: list[int] = field(default_factory=list)  # events naming the item before the tie group


@dataclass(slots=True)
class BacktestResult:
    config: BacktestConfig
    models: list[str]
    n_events: int
    n_items: int
    counts: dict[str, int]
    ts: np.ndarray  # per ranked positive
    position: np.ndarray
    cold: np.ndarray
    kind: np.ndarray  # event kind of each ranked positive (click, search, rating)
    learned: np.ndarray  # the user has an event in an earlier micro-batch
    item_events: np.ndarray  # per ranked positive: events naming its item before its tie group
    tail_start: int  # first event of the tail slice (a tie group's first event)
    greater: dict[str, np.ndarray]
    ties: dict[str, np.ndarray]
    rating_true: dict[str, list[float]]
    rating_pred: dict[str, list[float]]
    seconds: dict[str, dict[str, float]]
    model_configs: dict[str, dict[str, Any]]
    # Models fitted offline (`OfflineFit`): how many leading events they trained on, and the fit report.
    trained_until: dict[str, int] = field(default_factory=dict)
    offline_fits: dict[str, dict[str, Any]] = field(default_factory=dict)

    def values(self, model: str) -> dict[str, np.ndarray]:
        """Per-positive metric values of one model."""
        return ranking_metrics(self.greater[model], self.ties[model])

    def mask(self, slice_name: str) -> np.ndarray:
        if slice_name == "warm":
            return ~self.cold
        if slice_name == "cold":
            return self.cold.copy()
        if slice_name == "tail":
            return ~self.cold & (self.position >= self.tail_start)
        if slice_name == "learned":
            return self.learned.copy()
        if slice_name == "new_item":
            return ~self.cold & (self.item_events < self.config.new_item_events)
        if slice_name.startswith("kind:"):
            return ~self.cold & (self.kind == slice_name[5:])
        raise ValueError(f"unknown slice {slice_name!r}")

    def comparable(self, model: str, slice_name: str) -> bool:
        """False when a model trained offline on events whose positives are in the slice (a leak)."""
        until = self.trained_until.get(model)
        return until is None or not bool((self.mask(slice_name) & (self.position < until)).any())

    def not_comparable(self, slice_name: str) -> list[str]:
        return [m for m in self.models if not self.comparable(m, slice_name)]

    def totals(self, slice_name: str = "warm") -> dict[str, dict[str, float]]:
        m = self.mask(slice_name)
        out: dict[str, dict[str, float]] = {}
        for model in self.models:
            vals = self.values(model)
            row = {k: float(v[m].mean()) if m.any() else float("nan") for k, v in vals.items()}
            row["n"] = int(m.sum())
            out[model] = row
        return out

    def rating_totals(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for model in self.models:
            if model in self.rating_pred:
                err = rating_errors(self.rating_true[model], self.rating_pred[model])
                out[model] = {"rmse": err.rmse, "mae": err.mae, "n": err.n}
        return out

    def rolling(self) -> dict[str, Any]:
        """Warm-slice means per event-time window: {'start': [...], 'n': [...], model: {metric: [...]}}."""
        warm = ~self.cold
        if not warm.any():
            return {"window_s": None, "start": [], "n": [], "models": {}}
        t0, t1 = float(self.ts.min()), float(self.ts.max())
        window = self.config.window_s or max((t1 - t0) / self.config.windows, 1.0)
        idx = np.floor((self.ts - t0) / window).astype(np.int64)
        if self.config.window_s is None:
            # The last event sits exactly on the span's end: keep it in the last window, not its own.
            idx = np.minimum(idx, self.config.windows - 1)
        n_win = int(idx.max()) + 1
        counts = np.bincount(idx[warm], minlength=n_win)
        models: dict[str, dict[str, list[float | None]]] = {}
        for model in self.models:
            vals = self.values(model)
            per: dict[str, list[float | None]] = {}
            for k in RANKING_METRICS:
                sums = np.bincount(idx[warm], weights=vals[k][warm], minlength=n_win)
                per[k] = [float(s / c) if c else None for s, c in zip(sums, counts, strict=True)]
            models[model] = per
        return {
            "window_s": window,
            "start": [t0 + i * window for i in range(n_win)],
            "n": [int(c) for c in counts],
            "models": models,
        }


def tie_groups(events: Sequence[Event]) -> tuple[list[int], list[int]]:
    """Start and end (exclusive) of each run of equal timestamps, in stream order."""
    starts: list[int] = []
    ends: list[int] = []
    prev: float | None = None
    for i, e in enumerate(events):
        if prev is None or e.ts != prev:
            if starts:
                ends.append(i)
            starts.append(i)
            prev = e.ts
    if starts:
        ends.append(len(events))
    return starts, ends


def tail_start_of(events: Sequence[Event], fraction: float) -> int:
    """The first event of the tie group holding the event at `1 - fraction` of the stream.

    Snapped to a tie boundary so that no tie group is split between the part a model may
    train on offline and the part it is judged on.
    """
    cut = math.floor(len(events) * (1 - fraction))
    if cut >= len(events):
        return len(events)
    starts, _ends = tie_groups(events)
    return starts[bisect.bisect_right(starts, cut) - 1]


def score_users(model: InterestModel, users: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Scores (len(users), len(model.item_ids())) and which users the model knew.

    One matrix product when the model scores by `item_matrix() @ user_vector()`;
    the model's own `predict_many` when it has one; `predict` per user otherwise.
    Unknown users get all-equal scores, i.e. the expected rank of a random guess.
    """
    if isinstance(model, BatchScorer):
        mat, known = model.predict_many(users)
        mat = np.asarray(mat, dtype=np.float64)
        known = np.asarray(known, dtype=bool)
        mat[~known] = 0.0
        return mat, known
    known = np.zeros(len(users), dtype=bool)
    if type(model).predict is InterestModel.predict:
        items = np.asarray(model.item_matrix())
        # Score in the model's own precision: converting the catalog per batch costs more than the product.
        dtype = items.dtype if items.dtype in (np.float32, np.float64) else np.float64
        u = np.zeros((len(users), items.shape[1]), dtype=dtype)
        for row, user in enumerate(users):
            vec = model.user_vector(user)
            if vec is not None:
                u[row] = vec
                known[row] = True
        return (u @ items.astype(dtype, copy=False).T).astype(np.float64), known
    mat = np.zeros((len(users), len(model.item_ids())), dtype=np.float64)
    for row, user in enumerate(users):
        s = model.predict(user)
        if s is not None:
            mat[row] = s
            known[row] = True
    return mat, known


class _Scorer:
    """Scores a set of users over the evaluator's catalog order for one model."""

    def __init__(self, model: InterestModel, catalog: Sequence[str]) -> None:
        self.model = model
        ids = list(model.item_ids())
        index = {item: row for row, item in enumerate(ids)}
        missing = [i for i in catalog if i not in index]
        if missing:
            raise ValueError(f"model {model.name!r} lacks {len(missing)} catalog items, e.g. {missing[0]!r}")
        cols = np.fromiter((index[i] for i in catalog), dtype=np.int64, count=len(catalog))
        # None when the model's order already is the catalog order (no gather needed).
        self.cols = None if len(ids) == len(catalog) and np.array_equal(cols, np.arange(len(cols))) else cols

    def scores(self, users: Sequence[str]) -> np.ndarray:
        mat, _known = score_users(self.model, users)
        return mat if self.cols is None else mat[:, self.cols]


@dataclass(slots=True)
class BatchPlan:
    """What every model is asked about one micro-batch, before any of them learns it."""

    users: list[str]  # the users to score, each once
    rows: np.ndarray  # per ranked positive: its row in `users`
    targets: np.ndarray  # per ranked positive: the true item's catalog column
    excluded: np.ndarray | None  # (positives, items): the items each user already had
    rating_asks: list[Event]  # ratings with a known user and a known item


# Positives per scoring call: a big tie group (a month of Last.fm) is scored in pieces, all
# before any of it is learned, so the (positives x catalog) matrices stay small enough to be
# cheap (2,048 rows over 12,500 items made the ranking memory-bound and 3x slower).
MAX_PLAN_ROWS = 256


class _PlanBuilder:
    def __init__(self) -> None:
        self.rows: list[int] = []
        self.targets: list[int] = []
        self.ex_rows: list[np.ndarray] = []
        self.ex_cols: list[np.ndarray] = []
        self.users: dict[str, int] = {}
        self.rating_asks: list[Event] = []

    def add(self, user: str, target: int, exclude: list[int]) -> None:
        k = len(self.rows)
        self.rows.append(self.users.setdefault(user, len(self.users)))
        self.targets.append(target)
        if exclude:
            self.ex_rows.append(np.full(len(exclude), k, dtype=np.int64))
            self.ex_cols.append(np.asarray(exclude, dtype=np.int64))

    def full(self) -> bool:
        return len(self.rows) >= MAX_PLAN_ROWS

    def build(self, n_items: int) -> BatchPlan:
        excluded = None
        if self.rows:
            excluded = np.zeros((len(self.rows), n_items), dtype=bool)
            if self.ex_rows:
                excluded[np.concatenate(self.ex_rows), np.concatenate(self.ex_cols)] = True
        return BatchPlan(
            users=list(self.users),
            rows=np.asarray(self.rows, dtype=np.int64),
            targets=np.asarray(self.targets, dtype=np.int64),
            excluded=excluded,
            rating_asks=self.rating_asks,
        )


class Evaluator:
    """The evaluator's memory of the stream, separate from any model's: who had what, and when.

    Shared with `istream evaluate` (stream/evaluate.py), which ranks the same positives
    against the vectors the live system stored.
    """

    def __init__(self, catalog: Sequence[str], config: BacktestConfig) -> None:
        self.config = config
        self.cat_index = {item: row for row, item in enumerate(catalog)}
        self.n_items = len(catalog)
        self.seen: dict[str, list[int]] = {}  # user -> catalog rows interacted with, in order
        self.seen_set: dict[str, set[int]] = {}
        self.item_events = np.zeros(len(catalog), dtype=np.int64)  # events naming each item so far
        self.had_event: set[str] = set()  # users with any earlier event (searches without a click count)
        self.learned_users: set[str] = set()  # users with an event in a learned batch
        self.learned_items: set[str] = set()
        self.log = EvalLog()
        self.counts = {
            "positives": 0,
            "ranked": 0,
            "cold": 0,
            "repeats": 0,
            "same_tie_repeats": 0,
            "unknown_item": 0,
            "ratings_scored": 0,
        }

    def is_positive(self, e: Event) -> bool:
        return (
            (e.kind == "rating" and e.rating is not None and e.rating >= self.config.positive_threshold)
            or e.kind == "click"
            or (e.kind == "search" and e.clicked_item_id is not None)
        )

    def _row(self, e: Event) -> int | None:
        target = e.target_item
        return self.cat_index.get(target) if target is not None else None

    def plan(self, start: int, block: Sequence[Event]) -> list[BatchPlan]:
        """Note every positive of `block` (whole tie groups, `start` = index of its first event).

        Each tie group is judged against the history before it, never against the order
        inside it; the evaluator's history moves on a whole group at a time.
        """
        builders = [_PlanBuilder()]
        starts, ends = tie_groups(block)
        for g0, g1 in zip(starts, ends, strict=True):
            self._plan_group(start + g0, block[g0:g1], builders)
        return [b.build(self.n_items) for b in builders if b.rows or b.rating_asks or len(builders) == 1]

    def _plan_group(self, start: int, group: Sequence[Event], builders: list[_PlanBuilder]) -> None:
        counts, log = self.counts, self.log
        in_group: dict[str, list[int]] = {}  # user -> rows they interacted with in this group
        for e in group:
            row = self._row(e)
            if row is not None:
                rows = in_group.setdefault(e.user_id, [])
                if row not in rows:
                    rows.append(row)
        ranked: set[tuple[str, int]] = set()
        for offset, e in enumerate(group):
            row = self._row(e)
            if self.is_positive(e):
                counts["positives"] += 1
                if row is None:
                    counts["unknown_item"] += 1
                elif row in self.seen_set.get(e.user_id, ()):
                    counts["repeats"] += 1
                elif (e.user_id, row) in ranked:
                    counts["same_tie_repeats"] += 1
                else:
                    ranked.add((e.user_id, row))
                    history = self.seen.get(e.user_id, [])
                    others = [r for r in in_group[e.user_id] if r != row]
                    if builders[-1].full():
                        builders.append(_PlanBuilder())
                    builders[-1].add(e.user_id, row, history + others)
                    cold = e.user_id not in self.had_event
                    log.ts.append(e.ts)
                    log.position.append(start + offset)
                    log.cold.append(cold)
                    log.kind.append(e.kind)
                    log.learned.append(e.user_id in self.learned_users)
                    log.item_events.append(int(self.item_events[row]))
                    counts["ranked"] += 1
                    counts["cold"] += int(cold)
            if (
                e.kind == "rating"
                and e.rating is not None
                and e.user_id in self.learned_users
                and e.item_id in self.learned_items
            ):
                builders[-1].rating_asks.append(e)
                counts["ratings_scored"] += 1
        # Only now does the group become history: nothing in it depends on its inner order.
        for e in group:
            self.had_event.add(e.user_id)
            row = self._row(e)
            if row is not None:
                self.item_events[row] += 1
                user_set = self.seen_set.setdefault(e.user_id, set())
                if row not in user_set:
                    user_set.add(row)
                    self.seen.setdefault(e.user_id, []).append(row)

    def learned(self, batch: Sequence[Event]) -> None:
        for e in batch:
            self.learned_users.add(e.user_id)
            if e.target_item is not None:
                self.learned_items.add(e.target_item)


@dataclass(slots=True)
class _Pass:
    """What one replay of the stream measured for some of the models."""

    ev: Evaluator
    greater: dict[str, list[np.ndarray]]
    ties: dict[str, list[np.ndarray]]
    rating_true: dict[str, list[float]]
    rating_pred: dict[str, list[float]]

    def absorb(self, other: _Pass) -> None:
        """Take in another pass's models (the evaluator's history is the same in both)."""
        self.greater.update(other.greater)
        self.ties.update(other.ties)
        self.rating_true.update(other.rating_true)
        self.rating_pred.update(other.rating_pred)


def _replay(
    scorers: Mapping[str, _Scorer],
    catalog: Sequence[str],
    events: Sequence[Event],
    config: BacktestConfig,
    seconds: dict[str, dict[str, float]],
    on_learned: LearnHook | None,
    desc: str,
) -> _Pass:
    """Replay the whole stream through `models`, predict-then-learn per micro-batch."""
    models = {name: scorer.model for name, scorer in scorers.items()}
    names = list(models)
    raters = {n: m for n, m in models.items() if isinstance(m, RatingPredictor)}
    ev = Evaluator(catalog, config)
    out = _Pass(
        ev,
        greater={n: [] for n in names},
        ties={n: [] for n in names},
        rating_true={n: [] for n in raters},
        rating_pred={n: [] for n in raters},
    )
    group_starts, group_ends = tie_groups(events)

    def predict(plan: BatchPlan) -> None:
        for name in names:
            t = time.perf_counter()
            if len(plan.rows):
                s = scorers[name].scores(plan.users)[plan.rows]
                g, ti = rank_counts(s, plan.targets, plan.excluded)
                out.greater[name].append(g)
                out.ties[name].append(ti)
            if name in raters:
                for e in plan.rating_asks:
                    assert e.item_id is not None and e.rating is not None
                    p = raters[name].predict_rating(e.user_id, e.item_id)
                    if p is not None:
                        out.rating_true[name].append(e.rating)
                        out.rating_pred[name].append(p)
            seconds[name]["predict_s"] += time.perf_counter() - t

    with progress(len(events), desc, unit="ev", enabled=config.progress) as bar:
        for start in range(0, len(events), config.batch_size):
            batch = events[start : start + config.batch_size]
            # Score the tie groups that start in this batch, whole (they may run on past it),
            # before any model learns any of it.
            g_lo = bisect.bisect_left(group_starts, start)
            g_hi = bisect.bisect_left(group_starts, start + config.batch_size)
            if g_lo < g_hi:
                lo, hi = group_starts[g_lo], group_ends[g_hi - 1]
                for plan in ev.plan(lo, events[lo:hi]):
                    predict(plan)
            for name, model in models.items():
                t = time.perf_counter()
                result = model.learn(batch)
                seconds[name]["learn_s"] += time.perf_counter() - t
                if on_learned is not None:
                    on_learned(name, batch, result)
            ev.learned(batch)
            bar.update(len(batch))
    return out


def run_backtest(
    models: Mapping[str, InterestModel],
    data: BacktestData,
    config: BacktestConfig | None = None,
    on_learned: LearnHook | None = None,
) -> BacktestResult:
    """Replay `data` through every model (predict-then-learn per micro-batch).

    Models fitted offline are replayed in a second pass once their fit is done; the
    evaluator's history depends on the events only, so both passes rank the same positives
    against the same exclusions, and each model sees exactly what a single pass showed it.
    """
    config = config or BacktestConfig()
    if not models:
        raise ValueError("no models to backtest")
    if not data.items:
        raise ValueError("the event log has no catalog (no item records)")
    names = list(models)
    catalog = [i.item_id for i in data.items]

    seconds = {name: {"setup_s": 0.0, "fit_s": 0.0, "predict_s": 0.0, "learn_s": 0.0} for name in names}

    def set_up(names: Sequence[str]) -> dict[str, _Scorer]:
        scorers: dict[str, _Scorer] = {}
        for name in names:
            t = time.perf_counter()
            model = models[name]
            model.upsert_items(data.items)
            if data.profiles:
                model.set_profiles(data.profiles)
            # Built here, so that a model lacking catalog items fails before any fit starts.
            scorers[name] = _Scorer(model, catalog)
            seconds[name]["setup_s"] = time.perf_counter() - t
        return scorers

    events = data.events
    tail_start = tail_start_of(events, config.tail_fraction)
    offline = {n: m for n, m in models.items() if isinstance(m, OfflineFit)}
    online = {n: m for n, m in models.items() if n not in offline}
    background = config.fit_in_background and bool(online) and background_fits_pay()
    # The offline models first, so that their fits (the longest part) start before the online
    # models' set-up (the adapter encodes the catalog) and run beside it.
    offline_scorers = set_up(list(offline))
    fits = OfflineFits(offline, events[:tail_start], background)
    passes: list[_Pass] = []
    offline_fits: dict[str, dict[str, Any]] = {}
    try:
        online_scorers = set_up(list(online))
        if online:
            passes.append(_replay(online_scorers, catalog, events, config, seconds, on_learned, "backtest"))
        for name, (report, took) in fits.collect().items():
            offline_fits[name] = report
            seconds[name]["fit_s"] = took
    finally:
        fits.close()
    if offline:  # fitted now, in place
        desc = "backtest" if not online else "backtest (" + ", ".join(offline) + ")"
        passes.append(_replay(offline_scorers, catalog, events, config, seconds, on_learned, desc))
    trained_until = dict.fromkeys(offline, tail_start)

    measured = passes[0]
    for p in passes[1:]:
        measured.absorb(p)
    ev = measured.ev

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    log = ev.log
    return BacktestResult(
        config=config,
        models=names,
        n_events=len(data.events),
        n_items=len(catalog),
        counts=ev.counts,
        ts=np.asarray(log.ts, dtype=np.float64),
        position=np.asarray(log.position, dtype=np.int64),
        cold=np.asarray(log.cold, dtype=bool),
        learned=np.asarray(log.learned, dtype=bool),
        item_events=np.asarray(log.item_events, dtype=np.int64),
        tail_start=tail_start,
        kind=np.asarray(log.kind, dtype=str),
        greater={n: cat(measured.greater[n]) for n in names},
        ties={n: cat(measured.ties[n]) for n in names},
        rating_true=measured.rating_true,
        rating_pred=measured.rating_pred,
        seconds=seconds,
        model_configs={n: m.config() for n, m in models.items()},
        trained_until=trained_until,
        offline_fits=offline_fits,
    )
