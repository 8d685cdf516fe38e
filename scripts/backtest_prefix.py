"""The ML-100K backtest on the first N events, with model options the settings do not expose.

    python scripts/backtest_prefix.py --limit 15000 --models popularity,adapter,top_layers:1
    python scripts/backtest_prefix.py --models top_layers:1@s --opt top_layers:1@s:layer_lr_multiplier=0.001

For iterating on the fine-tuned models: the protocol is `istream backtest`'s (the same
`run_backtest`, micro-batches of 100, predict then learn), the models are built as the
backtest builds them plus any `FineTuneOptions` field given with `--opt LABEL:FIELD=JSON`.
`LABEL` is the model spec, optionally with `@name` so one spec can run under several
options in one pass. Base encodings are kept in `--cache` between runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.finetune.options import parse_overrides  # noqa: E402
from models.registry import build_model  # noqa: E402
from stream.backtest import BacktestConfig, load_lastfm, load_movielens, run_backtest  # noqa: E402
from stream.backtest.models import LazyEncoder  # noqa: E402
from stream.runtime import (  # noqa: E402
    build_interest_model,
    is_fine_tuned,
    model_options,
    seed_everything,
    spec_of,
)
from stream.settings import Settings  # noqa: E402
from stream.sources import SourceError  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "ml-100k"))
    p.add_argument("--lastfm", help="a Last.fm-2k folder instead of --data")
    p.add_argument("--profiles", action="store_true", help="MovieLens demographics for cold start")
    p.add_argument("--limit", type=int, default=15000, help="first N events (0 = all)")
    p.add_argument("--models", default="popularity,adapter")
    p.add_argument("--opt", action="append", default=[], help="LABEL:FIELD=JSON, e.g. lora:8:lr=0.001")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--cache", default=str(ROOT / ".istream" / "encodings"))
    a = p.parse_args()
    labels = a.models.split(",")
    try:
        opts = parse_overrides(a.opt, [x for x in labels if is_fine_tuned(x)])
    except ValueError as exc:
        p.error(str(exc))
    settings = Settings()
    try:
        data = load_lastfm(Path(a.lastfm)) if a.lastfm else load_movielens(Path(a.data), profiles=a.profiles)
    except SourceError as exc:
        sys.exit(f"backtest_prefix: {exc}")
    if a.limit:
        data.events = data.events[: a.limit]
    encoder = LazyEncoder(settings, Path(a.cache))
    models = {}
    for label in labels:
        spec = spec_of(label)
        seed_everything(settings.seed)
        if is_fine_tuned(spec):
            options = model_options(settings.model_copy(update={"model": spec})) | opts.get(label, {})
            models[label] = build_model(spec, encoder, **options)  # type: ignore[arg-type]
        else:
            models[label] = build_interest_model(settings.model_copy(update={"model": spec}), encoder)  # type: ignore[arg-type]
    started = time.perf_counter()
    result = run_backtest(models, data, BacktestConfig(batch_size=a.batch_size, progress=False))
    encoder.save()
    print(f"first {len(data.events)} events, batch {a.batch_size}, {time.perf_counter() - started:.0f} s")
    for slice_name in ("warm", "tail", "new_item", "cold"):
        for label, v in result.totals(slice_name).items():
            print(f"{slice_name:8s} {label:28s} NDCG@10 {v['ndcg@10']:.4f}  Recall@20 {v['recall@20']:.4f}")
    for label, sec in result.seconds.items():
        print(f"time  {label:28s} learn {sec['learn_s']:.1f} s  predict {sec['predict_s']:.1f} s")


if __name__ == "__main__":
    main()
