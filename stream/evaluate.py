"""`istream evaluate`: how well the vectors the live system stored ranked what users did next.

For every positive event the worker applied (`applied_events`), in event-time
order, the item is ranked against the item vectors of the model version named by
the user's stored vector as of just before that event by event time,
`user_vector_as_of(user, ts - 1 µs, true)`: what an application reading Postgres
at that moment would have got. Seen items are excluded as in the backtest.

Positives, cold start, repeats, the warm/tail/kind slices, the metrics and the
report folder are the backtest's own (`stream.backtest.driver.Evaluator`,
`models.metrics`, `stream.backtest.report`), so a live report and a backtest
report of the same events compare line by line. What differs, by design:

- the `learned` slice means "the user had a stored vector before the event"
  (in a backtest: "an event in an earlier micro-batch");
- a positive whose user has no stored vector yet is ranked by the prior of the
  newest version that had learned only earlier events (`Priors`), what
  `user_top_items` serves such a user (`model_versions.prior_vector`, 0004); a model
  without a prior (the untrained mean) ranks it as a random guess;
- an item without a vector in the version's model (a catalog record that came
  after the version) can never be served: it scores below every other item.

Retention thins the history this reads (docs/storage.md: "Retention and
`istream evaluate`"): versions it pruned make the vector as of an event older
than the one the application saw, and the counts report how many are missing.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, text

from models.events import Event
from models.metrics import RANKING_METRICS, rank_counts
from stream.backtest.driver import (
    BacktestConfig,
    BacktestResult,
    BatchPlan,
    Evaluator,
    tail_start_of,
    tie_groups,
)
from stream.progress import progress

# Positives per as-of query and scoring pass: bounds memory (positives x catalog) and round trips.
CHUNK_EVENTS = 2000
# "Just before" an event: Postgres timestamps have microsecond resolution.
JUST_BEFORE_S = 1e-6


class EvaluateError(ValueError):
    """Nothing to evaluate, or a database without the schema: a user mistake, one line."""


@dataclass(frozen=True, slots=True)
class Window:
    """Event-time range whose positives are ranked; earlier events still count as history."""

    since: float | None = None  # epoch seconds, inclusive
    until: float | None = None  # epoch seconds, exclusive

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise EvaluateError("--since must be before --until")


@dataclass(slots=True)
class LiveEvaluation:
    result: BacktestResult
    model: str  # the row name: live:<model spec>
    model_versions: list[str]  # the versions positives were ranked against
    seconds: float


def _ts(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def load_events(engine: Engine, until: float | None) -> list[Event]:
    """The applied events before `until`, as the backtest's events, in event-time order."""
    where = "WHERE ts < :until" if until is not None else ""
    # Ties in event time: user, then event id (the backtest keeps log order; MovieLens' log
    # is sorted by time, user, item, so only same-second events of one user may differ).
    sql = f"""
        SELECT event_id, user_id, kind, item_id, extract(epoch FROM ts)::float8 AS ts, rating
        FROM applied_events {where} ORDER BY ts, user_id, event_id
    """
    with engine.connect() as conn:
        rows = conn.execute(text(sql), {"until": _ts(until)} if until is not None else {}).all()
    events = []
    for r in rows:
        if r.kind == "search":
            events.append(Event(r.event_id, r.user_id, float(r.ts), "search", clicked_item_id=r.item_id))
        else:
            events.append(
                Event(r.event_id, r.user_id, float(r.ts), r.kind, item_id=r.item_id, rating=r.rating)
            )
    return events


def load_catalog(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT item_id FROM items ORDER BY item_id")).scalars())


def vectors_as_of(
    engine: Engine, users: Sequence[str], ts: np.ndarray
) -> tuple[list[str | None], np.ndarray | None, np.ndarray]:
    """Per (user, ts): the model version and vector `user_vector_as_of(user, ts - 1 µs, true)` returns.

    Returns (model versions, vectors or None when no user had one, known mask).
    """
    ats = [_ts(t - JUST_BEFORE_S) for t in ts]
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                """
                SELECT q.n, v.model_version, v.vector::real[] AS vector
                FROM unnest(CAST(:users AS text[]), CAST(:ats AS timestamptz[])) WITH ORDINALITY
                     AS q(user_id, at, n)
                CROSS JOIN LATERAL user_vector_as_of(q.user_id, q.at, true) v
                """
            ),
            {"users": list(users), "ats": ats},
        ).all()
    versions: list[str | None] = [None] * len(users)
    known = np.zeros(len(users), dtype=bool)
    vecs: np.ndarray | None = None
    for n, model_version, vector in rows:
        row = int(n) - 1
        if vecs is None:
            vecs = np.zeros((len(users), len(vector)), dtype=np.float32)
        vecs[row] = vector
        versions[row] = model_version
        known[row] = True
    return versions, vecs, known


class Priors:
    """What an application was served for a user without a stored vector, by event time.

    At event time t that is the prior of the newest version that had learned only events
    before t (`model_versions.metrics ->> 'learned_through_ts'`): a version published after
    the event's own batch has counted the event's item, and serving its prior would leak the
    answer. A version that records no watermark (the initial one) counts as learned from the start.
    """

    def __init__(self, engine: Engine) -> None:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT model_version, prior_vector, "
                    "coalesce((metrics ->> 'learned_through_ts')::float8, '-infinity') AS through "
                    "FROM model_versions WHERE prior_vector IS NOT NULL "
                    "ORDER BY through, created_at, model_version"
                )
            ).all()
        self.vectors = {m: np.asarray(v, dtype=np.float32) for m, v, _ in rows}
        self.versions = [m for m, _, _ in rows]
        self.through = np.asarray([t for _, _, t in rows], dtype=np.float64)

    def fill(
        self, versions: list[str | None], vecs: np.ndarray | None, known: np.ndarray, ts: np.ndarray
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """Give unknown rows the prior of the version current at their event time, in place on
        `versions`; returns (vectors, which rows got a prior)."""
        served = np.zeros(len(versions), dtype=bool)
        if not self.versions:
            return vecs, served
        # The newest version whose watermark is strictly before the event.
        at = np.searchsorted(self.through, ts, side="left") - 1
        for row in np.flatnonzero(~known & (at >= 0)):
            version = self.versions[at[row]]
            prior = self.vectors[version]
            if vecs is None:
                vecs = np.zeros((len(versions), len(prior)), dtype=np.float32)
            vecs[row] = prior
            versions[row] = version
            served[row] = True
        return vecs, served


class ItemMatrices:
    """Item vectors per model version, in the evaluator's catalog order; missing items flagged."""

    def __init__(self, engine: Engine, catalog: Sequence[str]) -> None:
        self.engine = engine
        self.index = {item: row for row, item in enumerate(catalog)}
        self.n = len(catalog)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, model_version: str) -> tuple[np.ndarray, np.ndarray]:
        """(matrix (n_items, dim) float32 as stored, present mask) of one model version."""
        if model_version not in self._cache:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT item_id, vector::real[] FROM item_vectors WHERE model_version = :m"),
                    {"m": model_version},
                ).all()
            present = np.zeros(self.n, dtype=bool)
            mat = np.zeros((self.n, len(rows[0][1]) if rows else 1), dtype=np.float32)
            for item_id, vector in rows:
                row = self.index.get(item_id)
                if row is not None:
                    mat[row] = vector
                    present[row] = True
            self._cache[model_version] = (mat, present)
        return self._cache[model_version]


def score(
    items: ItemMatrices, versions: Sequence[str | None], vecs: np.ndarray | None, known: np.ndarray
) -> np.ndarray:
    """Scores (positives, catalog): the row's vector against its model version's items.

    Rows with no vector (`known` false) score every item alike (a random guess); items the
    version has no vector for score -inf (never served).
    """
    out = np.zeros((len(versions), items.n), dtype=np.float64)
    by_version: dict[str, list[int]] = {}
    for row, v in enumerate(versions):
        if v is not None and known[row]:
            by_version.setdefault(v, []).append(row)
    for v, rows in by_version.items():
        mat, present = items.get(v)
        assert vecs is not None
        # float32 like the stored vectors (and pgvector's inner product), then float64 for ranking.
        s = (vecs[rows] @ mat.T).astype(np.float64)
        s[:, ~present] = -np.inf
        out[rows] = s
    return out


def _chunks(events: Sequence[Event], size: int) -> Iterator[tuple[int, Sequence[Event]]]:
    """About `size` events at a time, cut only between timestamp ties (the evaluator judges a
    tie group whole, as the backtest does)."""
    starts, _ends = tie_groups(events)
    cuts = [0]
    for g in starts:
        if g - cuts[-1] >= size:
            cuts.append(g)
    cuts.append(len(events))
    for a, b in itertools.pairwise(cuts):
        if b > a:
            yield a, events[a:b]


def model_spec(engine: Engine, model_versions: Sequence[str]) -> str:
    """The model family the versions came from (the registry's config, else the version's prefix)."""
    with engine.connect() as conn:
        if not model_versions:  # no positive had a stored vector before it: name what is stored
            model_versions = list(
                conn.execute(text("SELECT DISTINCT model_version FROM user_interest_vectors")).scalars()
            )
        if not model_versions:
            return "unknown"
        specs = set(
            conn.execute(
                text("SELECT config->>'model' FROM model_versions WHERE model_version = ANY(:m)"),
                {"m": list(model_versions)},
            ).scalars()
        ) - {None}
    if not specs:
        specs = {v.split("@")[0] for v in model_versions}
    return ",".join(sorted(str(s) for s in specs))


def evaluate_live(
    engine: Engine, config: BacktestConfig, window: Window = Window(), show_progress: bool = True
) -> LiveEvaluation:
    """Rank every positive the worker applied against the vector stored just before it."""
    started = time.perf_counter()
    catalog = load_catalog(engine)
    if not catalog:
        raise EvaluateError("the database holds no catalog (items): has a worker consumed anything?")
    events = load_events(engine, window.until)
    since = window.since if window.since is not None else -math.inf
    first = next((i for i, e in enumerate(events) if e.ts >= since), len(events))
    if first == len(events):
        raise EvaluateError("no applied events in the given range")
    ev = Evaluator(catalog, config)
    items = ItemMatrices(engine, catalog)
    priors = Priors(engine)
    keep: list[np.ndarray] = []
    greater: list[np.ndarray] = []
    ties: list[np.ndarray] = []
    learned: list[np.ndarray] = []
    counts = {"no_vector": 0, "served_prior": 0, "target_without_vector": 0}
    used: set[str] = set()

    def score_plan(plan: BatchPlan, n0: int, n1: int) -> None:
        """Rank one plan's positives (log entries n0..n1) against the vectors stored before them."""
        ts = np.asarray(ev.log.ts[n0:n1], dtype=np.float64)
        in_range = ts >= since
        keep.append(in_range)
        if not in_range.any():
            return
        rows = plan.rows[in_range]
        users = [plan.users[r] for r in rows]
        versions, vecs, known = vectors_as_of(engine, users, ts[in_range])
        vecs, served = priors.fill(versions, vecs, known, ts[in_range])
        s = score(items, versions, vecs, known | served)
        targets = plan.targets[in_range]
        excluded = plan.excluded[in_range] if plan.excluded is not None else None
        g, t = rank_counts(s, targets, excluded)
        greater.append(g)
        ties.append(t)
        learned.append(known)
        cold = np.asarray(ev.log.cold[n0:n1], dtype=bool)[in_range]
        counts["no_vector"] += int((~known & ~cold).sum())
        counts["served_prior"] += int(served.sum())
        counts["target_without_vector"] += int(np.isneginf(s[np.arange(len(targets)), targets]).sum())
        used.update(v for v in versions if v is not None)

    with progress(len(events), "evaluate", unit="ev", enabled=show_progress) as bar:
        for start, chunk in _chunks(events, CHUNK_EVENTS):
            n0 = len(ev.log.ts)
            for plan in ev.plan(start, chunk):
                n1 = n0 + len(plan.rows)
                score_plan(plan, n0, n1)
                n0 = n1
            bar.update(len(chunk))
    mask = np.concatenate(keep) if keep else np.zeros(0, dtype=bool)
    log = ev.log
    positions = np.asarray(log.position, dtype=np.int64)[mask] - first
    cold = np.asarray(log.cold, dtype=bool)[mask]
    counts.update(ev.counts)
    # The evaluator counted positives over the whole history; the report is over the range.
    counts["ranked"] = int(mask.sum())
    counts["cold"] = int(cold.sum())
    counts["pruned_versions"] = pruned_versions(engine)
    model_versions = sorted(used)
    name = f"live:{model_spec(engine, model_versions)}"
    cat = np.concatenate
    seconds = time.perf_counter() - started
    result = BacktestResult(
        config=config,
        models=[name],
        n_events=len(events) - first,
        n_items=len(catalog),
        counts=counts,
        ts=np.asarray(log.ts, dtype=np.float64)[mask],
        position=positions,
        cold=cold,
        kind=np.asarray(log.kind, dtype=str)[mask],
        learned=cat(learned) if learned else np.zeros(0, dtype=bool),
        greater={name: cat(greater) if greater else np.zeros(0, dtype=np.int64)},
        ties={name: cat(ties) if ties else np.zeros(0, dtype=np.int64)},
        rating_true={},
        rating_pred={},
        seconds={name: {"setup_s": 0.0, "predict_s": seconds, "learn_s": 0.0}},
        model_configs={name: {"model_versions": len(model_versions)}},
        item_events=np.asarray(log.item_events, dtype=np.int64)[mask],
        tail_start=tail_start_of(events[first:], config.tail_fraction),
    )
    return LiveEvaluation(result=result, model=name, model_versions=model_versions, seconds=seconds)


def pruned_versions(engine: Engine) -> int:
    """Versions retention removed (version numbers run 1, 2, 3… per user, so gaps are pruned rows)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT coalesce(sum(n), 0) FROM (SELECT max(version) - count(*) AS n "
                    "FROM user_interest_vectors GROUP BY user_id) t"
                )
            ).scalar_one()
        )


def meta(evaluation: LiveEvaluation, window: Window, database: str) -> dict[str, Any]:
    """Provenance for the report folder."""
    return {
        "source": {
            "kind": "live",
            "database": database,
            "since": None if window.since is None else _ts(window.since).isoformat(),
            "until": None if window.until is None else _ts(window.until).isoformat(),
        },
        "model_versions": evaluation.model_versions,
        "wall_seconds": evaluation.seconds,
        "finished_at": datetime.now(UTC).isoformat(),
    }


def load_against(path: Path) -> dict[str, Any]:
    """A backtest report (its folder or result.json) to set beside a live evaluation."""
    file = path / "result.json" if path.is_dir() else path
    try:
        doc = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvaluateError(f"cannot read the backtest report {file}: {exc}") from None
    if not isinstance(doc, dict) or "totals" not in doc:
        raise EvaluateError(f"{file} is not a backtest report (no totals)")
    return doc


def compare(result: BacktestResult, live_model: str, reference: dict[str, Any], model: str | None) -> str:
    """Live and backtest figures side by side, per slice and metric, with the relative difference."""
    spec = live_model.removeprefix("live:")
    models = list(reference["totals"].get("warm", {}))
    model = model or spec
    if model not in models:
        raise EvaluateError(f"the backtest report has no model {model!r} (it has: {', '.join(models)})")
    lines = [
        f"live vs backtest ({model}):",
        "",
        "| slice | metric | live | backtest | live / backtest |",
        "|---|---|---|---|---|",
    ]
    for slice_name in ("warm", "tail", "cold"):
        live = result.totals(slice_name)[live_model]
        bt = reference["totals"].get(slice_name, {}).get(model, {})
        for k in RANKING_METRICS:
            a, b = live.get(k), bt.get(k)
            ratio = f"{a / b:.3f}" if a is not None and b else "—"
            lines.append(f"| {slice_name} | {k} | {_fmt(a)} | {_fmt(b)} | {ratio} |")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.4f}"
