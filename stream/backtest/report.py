"""A backtest's report: one JSON with every figure, a Markdown summary, PNG rolling curves."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import re
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from models.metrics import RANKING_METRICS
from stream.backtest.driver import BacktestResult

SLICES = {
    "warm": "full stream",
    "tail": "last {pct}% of events",
    "new_item": "new items (fewer than {new} earlier events of the item)",
    "learned": "users with an event in an earlier batch",
    "cold": "cold start (the user's first event)",
}
# The slices shown side by side, and the ones each model is compared with the best baseline on.
HEADLINE = ("warm", "tail", "new_item")
HEADLINE_METRICS = ("ndcg@10", "recall@20")
# Windows with fewer positives than this are left out of the plots (the JSON keeps them): noise.
MIN_WINDOW_N = 20
_PACKAGES = ("interest-stream", "numpy", "torch", "transformers", "river")


def code_version(repo: Path | None = None) -> dict[str, Any]:
    """Git commit of the code that ran, and whether the tree had uncommitted changes."""
    cwd = repo or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain")
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "git_commit": git("rev-parse", "HEAD"),
        # Uncommitted changes, and files git does not track yet (code a commit id does not pin down).
        "git_dirty": None if status is None else any(not ln.startswith("??") for ln in status.splitlines()),
        "git_untracked": None
        if status is None
        else [ln[3:] for ln in status.splitlines() if ln.startswith("??")],
        "python": platform.python_version(),
        "packages": versions,
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN: missing figures are null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def summary(result: BacktestResult) -> dict[str, Any]:
    return {
        "totals": {s: result.totals(s) for s in SLICES},
        "versus_best_baseline": {s: versus_baselines(result, s) for s in HEADLINE},
        "best_baseline": {s: best_baselines(result, s) for s in HEADLINE},
        # New items: text models against the best baseline that never reads text.
        "versus_best_id_only_baseline": {"new_item": versus_baselines(result, "new_item", ID_ONLY_BASELINES)},
        "best_id_only_baseline": {"new_item": best_baselines(result, "new_item", ID_ONLY_BASELINES)},
        # Models trained offline on events of the slice (e.g. sasrec on the full stream): their
        # figures there are leaky, shown but never compared.
        "not_comparable": {s: result.not_comparable(s) for s in SLICES},
        "offline_fits": result.offline_fits,
        # Warm positives split by what they were: clicks, searches that led to a click, ratings.
        "totals_by_kind": {k: result.totals(f"kind:{k}") for k in sorted(set(result.kind.tolist()))},
        "ratings": result.rating_totals(),
        "counts": {**result.counts, "events": result.n_events, "items": result.n_items},
        "tail_start_event": result.tail_start,
        "new_item_events": result.config.new_item_events,
    }


BACKTEST_PROTOCOL = (
    "predict-then-learn per micro-batch; full catalog minus the user's seen items; "
    "ties at their expected rank under a random tie-break (docs/backtest.md)"
)
LIVE_PROTOCOL = (
    "live: each positive the worker applied, ranked against the item vectors of the model version "
    "named by the user's stored vector as of just before the event (event time); full catalog minus "
    "the user's seen items; ties at their expected rank under a random tie-break (README: istream evaluate)"
)


def to_json(
    result: BacktestResult, meta: dict[str, Any] | None = None, protocol: str = BACKTEST_PROTOCOL
) -> dict[str, Any]:
    doc = {
        "protocol": protocol,
        "config": dataclasses.asdict(result.config),
        "models": {m: result.model_configs.get(m, {}) for m in result.models},
        **summary(result),
        "seconds": result.seconds,
        "rolling": result.rolling(),
        **(meta or {}),
    }
    return _clean(doc)


def _fmt(v: float | None, digits: int = 4) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _cell(result: BacktestResult, model: str, slice_name: str, value: float | None) -> str:
    text = _fmt(value)
    return text if result.comparable(model, slice_name) or text == "—" else f"({text})†"


def table(result: BacktestResult, slice_name: str = "warm") -> str:
    """A Markdown table of one slice: a row per model († = trained offline on these events)."""
    totals = result.totals(slice_name)
    ratings = result.rating_totals() if slice_name == "warm" else {}
    head = ["model", *RANKING_METRICS, "n"] + (["rmse", "mae"] if ratings else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for model in result.models:
        row = totals[model]
        cells = [model, *(_cell(result, model, slice_name, row[k]) for k in RANKING_METRICS), str(row["n"])]
        if ratings:
            r = ratings.get(model)
            cells += [_fmt(r["rmse"]), _fmt(r["mae"])] if r else ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# `sasrec` is a baseline too, but trained offline on the events before the tail: it counts only
# on slices inside the tail (`not_comparable` keeps it out elsewhere).
BASELINES = frozenset({"popularity", "biased_mf", "decayed_mean", "item_knn", "sasrec"})


# Baselines that never read item text: the new-item goal compares text models with these.
ID_ONLY_BASELINES = frozenset({"popularity", "biased_mf", "item_knn", "sasrec"})


def is_baseline(model: str, pool: frozenset[str] = BASELINES) -> bool:
    return model.partition(":")[0] in pool


def best_baselines(
    result: BacktestResult, slice_name: str = "warm", pool: frozenset[str] = BASELINES
) -> dict[str, dict[str, Any]]:
    """Per metric: the best comparable baseline of the run on the slice, and its value."""
    totals = result.totals(slice_name)
    base = [m for m in result.models if is_baseline(m, pool) and result.comparable(m, slice_name)]
    out: dict[str, dict[str, Any]] = {}
    for k in RANKING_METRICS:
        finite = [b for b in base if math.isfinite(totals[b][k])]
        if finite:
            best = max(finite, key=lambda b: totals[b][k])
            out[k] = {"model": best, "value": totals[best][k]}
    return out


def versus_baselines(
    result: BacktestResult, slice_name: str = "warm", pool: frozenset[str] = BASELINES
) -> dict[str, dict[str, float]]:
    """For every comparable model: each metric relative to the best baseline of the run (1.10 = +10%).

    Baselines get a row too (the best one is 1.0), so a table shows how far apart they are.
    """
    totals = result.totals(slice_name)
    best = best_baselines(result, slice_name, pool)
    if not best:
        return {}
    out: dict[str, dict[str, float]] = {}
    for model in result.models:
        if not result.comparable(model, slice_name):
            continue
        row = {}
        for k in RANKING_METRICS:
            ref = best.get(k, {}).get("value", float("nan"))
            row[k] = totals[model][k] / ref if ref > 0 else float("nan")
        out[model] = row
    return out


def _versus_table(result: BacktestResult, slice_name: str) -> list[str]:
    rel = versus_baselines(result, slice_name)
    if not rel:
        return []
    head = ["model", *RANKING_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for model, row in rel.items():
        cells = [f"{row[k]:.2f}×" if math.isfinite(row[k]) else "—" for k in RANKING_METRICS]
        lines.append("| " + " | ".join([model, *cells]) + " |")
    return lines


def side_by_side(result: BacktestResult) -> str:
    """Full stream, tail and new items next to each other: NDCG@10 and Recall@20, and the ratio
    to the best comparable baseline of the same slice."""
    head = ["model"]
    for s in HEADLINE:
        for k in HEADLINE_METRICS:
            head.append(f"{_SHORT[s]} {k}")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    totals = {s: result.totals(s) for s in HEADLINE}
    rel = {s: versus_baselines(result, s) for s in HEADLINE}
    for model in result.models:
        cells = [model]
        for s in HEADLINE:
            for k in HEADLINE_METRICS:
                cell = _cell(result, model, s, totals[s][model][k])
                r = rel[s].get(model, {}).get(k)
                if r is not None and math.isfinite(r) and not is_baseline(model):
                    cell += f" ({r:.2f}×)"
                cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    n = " · ".join(f"{_SHORT[s]}: n = {next(iter(totals[s].values()))['n']}" for s in HEADLINE)
    return "\n".join([*lines, "", n])


_SHORT = {"warm": "full", "tail": "tail", "new_item": "new item"}


def markdown(result: BacktestResult, meta: dict[str, Any] | None = None, live: bool = False) -> str:
    pct = round(result.config.tail_fraction * 100)
    c = result.counts
    how = (
        "applied by the worker, each positive ranked against the user's stored vector as of just "
        "before it (event time)"
        if live
        else f"micro-batches of {result.config.batch_size}"
    )
    parts = [
        "# Live evaluation summary" if live else "# Backtest summary",
        "",
        f"{result.n_events} events, {result.n_items} items, {how}; "
        f"{c['ranked']} positives ranked ({c['cold']} cold start), {c['repeats']} repeats and "
        f"{c['unknown_item']} unknown items not ranked. "
        f"Positive: rating ≥ {result.config.positive_threshold:g}, clicks, searches with a click.",
        "",
    ]
    if live:
        parts += [
            f"Warm positives whose user had no stored vector yet: {c.get('no_vector', 0)}; "
            f"positives ranked by the prior of the version then current (no prior: a random "
            f"guess): {c.get('served_prior', 0)}; targets without an item vector in the version's model: "
            f"{c.get('target_without_vector', 0)}; "
            f"versions pruned by retention: {c.get('pruned_versions', 0)}.",
            "",
        ]
    parts += [
        f"## side by side (full stream, last {pct}%, new items)",
        "",
        side_by_side(result),
        "",
        "In parentheses: the ratio to the best baseline of the same slice in this run. "
        "†: trained offline on events of this slice (not comparable, never the best baseline).",
        "",
    ]
    new = result.config.new_item_events
    for s, label in SLICES.items():
        parts += [f"## {label.format(pct=pct, new=new)}", "", table(result, s), ""]
        if s in HEADLINE and (vs := _versus_table(result, s)):
            best = best_baselines(result, s)
            which = ", ".join(f"{k} {v['model']}" for k, v in best.items())
            parts += [f"Relative to the best baseline of this run on each metric ({which}):", "", *vs, ""]
        if s == "new_item" and (best_id := best_baselines(result, s, ID_ONLY_BASELINES)).get("ndcg@10"):
            ref = best_id["ndcg@10"]
            rows = [
                f"{m} {result.totals(s)[m]['ndcg@10'] / ref['value']:.2f}×"
                for m in result.models
                if not is_baseline(m) and ref["value"] > 0
            ]
            if rows:
                parts += [
                    f"NDCG@10 over the best ID-only baseline ({ref['model']}, {ref['value']:.4f}): "
                    + ", ".join(rows),
                    "",
                ]
    speed = [
        "| model | setup s | offline fit s | predict s | learn s | events/s (learn) |",
        "|---|---|---|---|---|---|",
    ]
    for m in result.models:
        sec = result.seconds[m]
        rate = result.n_events / sec["learn_s"] if sec["learn_s"] > 0 else float("inf")
        speed.append(
            f"| {m} | {sec['setup_s']:.1f} | {sec.get('fit_s', 0.0):.1f} | {sec['predict_s']:.1f} | "
            f"{sec['learn_s']:.1f} | {rate:,.0f} |"
        )
    if not live:
        parts += ["## time", "", *speed, ""]
    if meta:
        parts += ["## provenance", "", "```json", json.dumps(_clean(meta), indent=2, default=str), "```", ""]
    return "\n".join(parts)


def plot_rolling(result: BacktestResult, out_dir: Path) -> list[Path]:
    """One PNG per metric (a line per model) and one grid of all metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roll = result.rolling()
    if not roll["start"]:
        return []
    x = [datetime.fromtimestamp(t, tz=UTC) for t in roll["start"]]
    paths: list[Path] = []
    fig_all, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for ax_all, metric in zip(axes.flat, RANKING_METRICS, strict=True):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for target in (ax, ax_all):
            for model in result.models:
                ys = [
                    math.nan if v is None or n < MIN_WINDOW_N else v
                    for v, n in zip(roll["models"][model][metric], roll["n"], strict=True)
                ]
                target.plot(x, ys, marker=".", label=model)
            target.set_title(f"{metric} per {roll['window_s'] / 3600:.3g} h window (warm positives)")
            target.set_ylabel(metric)
            target.grid(alpha=0.3)
        ax.legend()
        fig.autofmt_xdate()
        fig.tight_layout()
        path = out_dir / f"rolling_{metric.replace('@', '_at_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    axes.flat[0].legend()
    fig_all.autofmt_xdate()
    fig_all.tight_layout()
    grid = out_dir / "rolling.png"
    fig_all.savefig(grid, dpi=110)
    plt.close(fig_all)
    # And one per model, every metric on it: how a single model's tracking evolves.
    for model in result.models:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for metric in RANKING_METRICS:
            ys = [
                math.nan if v is None or n < MIN_WINDOW_N else v
                for v, n in zip(roll["models"][model][metric], roll["n"], strict=True)
            ]
            ax.plot(x, ys, marker=".", label=metric)
        ax.set_title(f"{model}: rolling metrics per {roll['window_s'] / 3600:.3g} h window (warm positives)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.autofmt_xdate()
        fig.tight_layout()
        path = out_dir / f"model_{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return [grid, *paths]


def plot_versus(result: BacktestResult, out_dir: Path) -> list[Path]:
    """Bars: each model's NDCG@10 and Recall@20 over the best baseline, per headline slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = {s: versus_baselines(result, s) for s in HEADLINE}
    if not any(rel.values()):
        return []
    fig, axes = plt.subplots(1, len(HEADLINE_METRICS), figsize=(6 * len(HEADLINE_METRICS), 4.5))
    width = 0.8 / len(HEADLINE)
    x = np.arange(len(result.models))
    for ax, metric in zip(np.atleast_1d(axes), HEADLINE_METRICS, strict=True):
        for j, s in enumerate(HEADLINE):
            ys = [rel[s].get(m, {}).get(metric, math.nan) for m in result.models]
            ax.bar(x + (j - (len(HEADLINE) - 1) / 2) * width, ys, width, label=_SHORT[s])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(x, result.models, rotation=30, ha="right")
        ax.set_title(f"{metric} / best baseline of the slice")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out_dir / "versus_best_baseline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_report(
    result: BacktestResult, out_dir: Path, meta: dict[str, Any] | None = None, live: bool = False
) -> list[Path]:
    """The report folder of a backtest, or of `istream evaluate` (live=True): same files, same figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = to_json(result, meta, LIVE_PROTOCOL if live else BACKTEST_PROTOCOL)
    json_path = out_dir / "result.json"
    json_path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    md_path = out_dir / "summary.md"
    md_path.write_text(markdown(result, meta, live=live))
    return [json_path, md_path, *plot_versus(result, out_dir), *plot_rolling(result, out_dir)]
