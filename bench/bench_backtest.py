"""Backtest throughput on ML-100K (or Last.fm-2k): wall time of the whole run, and where it goes per model.

Prints figures, asserts nothing. The evaluator's own cost (ranking every
positive over the full catalog) is measured as the time of a run with the
cheapest model alone, so the per-model rows can be read as ratios to it.

    python bench/bench_backtest.py                       # the baselines
    python bench/bench_backtest.py --models popularity,biased_mf,decayed_mean,adapter
    python bench/bench_backtest.py --limit 20000 --batch-size 100
    python bench/bench_backtest.py --lastfm ../shared/data/lastfm-2k --limit 100000 \
        --models popularity,biased_mf,sasrec,adapter     # a 100,000-event log over 8,009 items
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.backtest.data import load_lastfm, load_movielens  # noqa: E402
from stream.backtest.driver import run_backtest  # noqa: E402
from stream.backtest.models import build_models, check_models, parse_model_list  # noqa: E402
from stream.backtest.report import table  # noqa: E402
from stream.backtest.run import config_from  # noqa: E402
from stream.settings import Settings  # noqa: E402
from stream.sources import SourceError  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / ".." / "shared" / "data" / "ml-100k")
    ap.add_argument("--lastfm", type=Path, help="a Last.fm-2k folder instead of --data's MovieLens 100K")
    ap.add_argument("--models", default="popularity,biased_mf,decayed_mean")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument(
        "--fit-here",
        action="store_true",
        help="fit offline models (sasrec) in this process before the replay, not beside it in a child",
    )
    args = ap.parse_args()

    settings = Settings()
    names = check_models(parse_model_list(args.models))
    config = config_from(settings, batch_size=args.batch_size, progress=args.progress)
    config = dataclasses.replace(config, fit_in_background=not args.fit_here)
    t = time.perf_counter()
    try:
        if args.lastfm:
            data = load_lastfm(args.lastfm, limit=args.limit)
        else:
            data = load_movielens(args.data, limit=args.limit)
    except SourceError as exc:
        sys.exit(f"bench_backtest: {exc}")
    load_s = time.perf_counter() - t
    print(
        f"cores: {os.cpu_count()}; data: {len(data.events)} events over {len(data.items)} items, "
        f"load {load_s:.1f} s"
    )

    # The evaluator alone: ranking with the cheapest model.
    base = run_backtest(build_models(["popularity"], settings), data, config)
    eval_s = sum(base.seconds["popularity"].values())

    t = time.perf_counter()
    models = build_models(names, settings)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    result = run_backtest(models, data, config)
    run_s = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    where = "in a child process beside the replay" if config.fit_in_background else "in this process first"
    print(f"\nmodels: {', '.join(names)}; micro-batches of {config.batch_size}; offline fits {where}")
    print(
        f"build {build_s:.1f} s, replay {run_s:.1f} s, total {load_s + build_s + run_s:.1f} s, "
        f"peak RSS {peak_mb:.0f} MB"
    )
    print(f"evaluator alone (popularity only): {eval_s:.1f} s")
    print("\n| model | setup s | fit s | predict s | learn s | learn ev/s | predict+learn vs popularity |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        s = result.seconds[name]
        rate = len(data.events) / s["learn_s"] if s["learn_s"] else float("inf")
        ratio = (s["predict_s"] + s["learn_s"]) / max(eval_s, 1e-9)
        print(
            f"| {name} | {s['setup_s']:.1f} | {s['fit_s']:.1f} | {s['predict_s']:.1f} | {s['learn_s']:.1f} "
            f"| {rate:,.0f} | {ratio:.1f}x |"
        )
    print("\nfull stream:\n" + table(result, "warm"))
    print("\nlast 20%:\n" + table(result, "tail"))


if __name__ == "__main__":
    main()
