"""The backtest driver: replay events through `InterestModel`s, predict first, then learn.

Protocol (the README states it; `docs/backtest.md` has the details):

- Events are taken in event-time order and cut into micro-batches of
  `batch_size` events, as the worker would see them.
- Every event of a batch is scored before any event of that batch is learned,
  for every model, so no model sees the answer it is asked about.
- A *positive* is a rating at or above `positive_threshold`, a click, or a
  search that led to a click; its true item is the rated/clicked item.
- Each positive is ranked against the whole catalog minus the items its user
  interacted with before it (ratings of any value, clicks, clicked searches).
  A positive whose item the user already had is a repeat and is not ranked.
- A positive whose user has no earlier event at all is *cold start*; cold
  positives are their own slice and the headline totals are over the others
  (*warm*). Warm positives whose user's earlier events all sit in the same
  micro-batch are scored by a model that has not learned them yet, as in
  production; the `learned` slice keeps only positives whose user has an event
  in an earlier batch.
- Rating errors (RMSE/MAE) are over ratings whose user and item both appear in
  earlier batches, for models that predict ratings (`predict_rating`).

Models are scored with one matrix product per batch where they allow it (the
default `predict` is `item_matrix() @ user_vector()`); a model can offer a
faster or different scorer through `predict_many(user_ids) -> (scores, known)`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.core import BatchResult, BatchScorer, InterestModel, RatingPredictor
from models.events import Event
from models.metrics import RANKING_METRICS, rank_counts, ranking_metrics, rating_errors
from stream.backtest.data import BacktestData
from stream.progress import progress


@dataclass(frozen=True, slots=True)
class BacktestConfig:
    batch_size: int = 100
    positive_threshold: float = 4.0
    window_s: float | None = None  # rolling-curve window in event time; None = span / windows
    windows: int = 40
    tail_fraction: float = 0.2  # totals are also given over this last fraction of events
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.window_s is not None and self.window_s <= 0:
            raise ValueError("window_s must be > 0")
        if not 0 < self.tail_fraction <= 1:
            raise ValueError("tail_fraction must be in (0, 1]")


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
    greater: dict[str, np.ndarray]
    ties: dict[str, np.ndarray]
    rating_true: dict[str, list[float]]
    rating_pred: dict[str, list[float]]
    seconds: dict[str, dict[str, float]]
    model_configs: dict[str, dict[str, Any]]

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
        if slice_name.startswith("kind:"):
            return ~self.cold & (self.kind == slice_name[5:])
        raise ValueError(f"unknown slice {slice_name!r}")

    @property
    def tail_start(self) -> int:
        return math.floor(self.n_events * (1 - self.config.tail_fraction))

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


def _batches(events: Sequence[Event], size: int) -> Iterator[tuple[int, Sequence[Event]]]:
    for start in range(0, len(events), size):
        yield start, events[start : start + size]


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
        self.had_event: set[str] = set()  # users with any earlier event (searches without a click count)
        self.learned_users: set[str] = set()  # users with an event in an earlier batch
        self.learned_items: set[str] = set()
        self.log = EvalLog()
        self.counts = {
            "positives": 0,
            "ranked": 0,
            "cold": 0,
            "repeats": 0,
            "unknown_item": 0,
            "ratings_scored": 0,
        }

    def is_positive(self, e: Event) -> bool:
        return (
            (e.kind == "rating" and e.rating is not None and e.rating >= self.config.positive_threshold)
            or e.kind == "click"
            or (e.kind == "search" and e.clicked_item_id is not None)
        )

    def plan(self, start: int, batch: Sequence[Event]) -> BatchPlan:
        """Walk the batch in event order, noting each positive against the history before it."""
        rows: list[int] = []
        targets: list[int] = []
        ex_rows: list[np.ndarray] = []
        ex_cols: list[np.ndarray] = []
        users: dict[str, int] = {}
        rating_asks: list[Event] = []
        counts, log = self.counts, self.log
        for offset, e in enumerate(batch):
            target = e.target_item
            row = self.cat_index.get(target) if target is not None else None
            history = self.seen.get(e.user_id)
            history_set = self.seen_set.get(e.user_id, set())
            if self.is_positive(e):
                counts["positives"] += 1
                if row is None:
                    counts["unknown_item"] += 1
                elif row in history_set:
                    counts["repeats"] += 1
                else:
                    k = len(rows)
                    rows.append(users.setdefault(e.user_id, len(users)))
                    targets.append(row)
                    if history:
                        ex_rows.append(np.full(len(history), k, dtype=np.int64))
                        ex_cols.append(np.asarray(history, dtype=np.int64))  # a copy: the prefix so far
                    cold = e.user_id not in self.had_event
                    log.ts.append(e.ts)
                    log.position.append(start + offset)
                    log.cold.append(cold)
                    log.kind.append(e.kind)
                    log.learned.append(e.user_id in self.learned_users)
                    counts["ranked"] += 1
                    counts["cold"] += int(cold)
            if (
                e.kind == "rating"
                and e.rating is not None
                and e.user_id in self.learned_users
                and e.item_id in self.learned_items
            ):
                rating_asks.append(e)
            self.had_event.add(e.user_id)
            if row is not None and row not in history_set:
                self.seen.setdefault(e.user_id, []).append(row)
                self.seen_set.setdefault(e.user_id, set()).add(row)
        excluded = None
        if rows:
            excluded = np.zeros((len(rows), self.n_items), dtype=bool)
            if ex_rows:
                excluded[np.concatenate(ex_rows), np.concatenate(ex_cols)] = True
        counts["ratings_scored"] += len(rating_asks)
        return BatchPlan(
            users=list(users),
            rows=np.asarray(rows, dtype=np.int64),
            targets=np.asarray(targets, dtype=np.int64),
            excluded=excluded,
            rating_asks=rating_asks,
        )

    def learned(self, batch: Sequence[Event]) -> None:
        for e in batch:
            self.learned_users.add(e.user_id)
            if e.target_item is not None:
                self.learned_items.add(e.target_item)


def run_backtest(
    models: Mapping[str, InterestModel],
    data: BacktestData,
    config: BacktestConfig | None = None,
    on_learned: LearnHook | None = None,
) -> BacktestResult:
    """Replay `data` through every model in one pass (predict-then-learn per micro-batch)."""
    config = config or BacktestConfig()
    if not models:
        raise ValueError("no models to backtest")
    if not data.items:
        raise ValueError("the event log has no catalog (no item records)")
    names = list(models)
    catalog = [i.item_id for i in data.items]

    seconds = {name: {"setup_s": 0.0, "predict_s": 0.0, "learn_s": 0.0} for name in names}
    scorers: dict[str, _Scorer] = {}
    for name, model in models.items():
        t = time.perf_counter()
        model.upsert_items(data.items)
        if data.profiles:
            model.set_profiles(data.profiles)
        scorers[name] = _Scorer(model, catalog)
        seconds[name]["setup_s"] = time.perf_counter() - t
    raters = {n: m for n, m in models.items() if isinstance(m, RatingPredictor)}

    ev = Evaluator(catalog, config)
    greater: dict[str, list[np.ndarray]] = {n: [] for n in names}
    ties: dict[str, list[np.ndarray]] = {n: [] for n in names}
    rating_true: dict[str, list[float]] = {n: [] for n in raters}
    rating_pred: dict[str, list[float]] = {n: [] for n in raters}

    with progress(len(data.events), "backtest", unit="ev", enabled=config.progress) as bar:
        for start, batch in _batches(data.events, config.batch_size):
            plan = ev.plan(start, batch)
            # Every model scores the whole batch before any model learns any of it.
            for name in names:
                t = time.perf_counter()
                if len(plan.rows):
                    s = scorers[name].scores(plan.users)[plan.rows]
                    g, ti = rank_counts(s, plan.targets, plan.excluded)
                    greater[name].append(g)
                    ties[name].append(ti)
                if name in raters:
                    for e in plan.rating_asks:
                        assert e.item_id is not None and e.rating is not None
                        p = raters[name].predict_rating(e.user_id, e.item_id)
                        if p is not None:
                            rating_true[name].append(e.rating)
                            rating_pred[name].append(p)
                seconds[name]["predict_s"] += time.perf_counter() - t
            for name, model in models.items():
                t = time.perf_counter()
                result = model.learn(batch)
                seconds[name]["learn_s"] += time.perf_counter() - t
                if on_learned is not None:
                    on_learned(name, batch, result)
            ev.learned(batch)
            bar.update(len(batch))

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
        kind=np.asarray(log.kind, dtype=str),
        greater={n: cat(greater[n]) for n in names},
        ties={n: cat(ties[n]) for n in names},
        rating_true=rating_true,
        rating_pred=rating_pred,
        seconds=seconds,
        model_configs={n: m.config() for n, m in models.items()},
    )
