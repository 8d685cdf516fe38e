"""What user-level differential privacy costs in learn speed: DP off vs on, one process.

    python bench/bench_privacy.py                       # adapter, DP off / ε=8 / ε=1, 20,000 events
    python bench/bench_privacy.py --events 5000 --batch-size 50 --epsilons 8,1

One encoder (the catalog is encoded once) and one model per variant, fed the same
event-time-ordered ML-100K ratings in micro-batches; the variants take turns batch by
batch, so a busy neighbour on a shared machine slows them alike. Printed per variant:
events/s of `learn`, milliseconds per batch (median and p99: a worker's freshness
waits on one batch), the ratio to DP off, and the ε spent at the end (δ = 1/users seen
unless --delta). `--batch-size 50` is what a worker sees at 100 events/s with
0.5-second batches; the backtest runs 100.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "ml-100k"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--model", default="adapter")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--epsilons", default="8,1", help="DP variants to run beside DP off")
    p.add_argument("--delta", type=float, default=None, help="δ (default 1/users seen)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    a = p.parse_args()
    if not (a.data / "u.data").is_file():
        sys.exit(f"bench_privacy: {a.data} is not a MovieLens 100K folder")
    try:
        epsilons = [float(x) for x in a.epsilons.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"bench_privacy: --epsilons takes numbers, got {a.epsilons!r}")
    if a.events < 1 or a.batch_size < 1:
        sys.exit("bench_privacy: --events and --batch-size must be >= 1")

    import torch

    from models.encoder import BaseEncoder
    from models.events import Event, Item
    from models.registry import build_model
    from stream.sources import movielens_items, movielens_ratings

    items = [Item(r["item_id"], r["text"], r["attrs"]) for r in movielens_items(a.data)]
    events = [
        Event(
            r["event_id"], r["user_id"], r["ts"] / 1000.0, "rating", item_id=r["item_id"], rating=r["rating"]
        )
        for r in movielens_ratings(a.data, a.events)
    ]
    print(
        f"bench_privacy: {platform.node()} torch {torch.__version__} device {a.device}, "
        f"{a.model}, {len(events)} events, batch {a.batch_size}",
        flush=True,
    )
    enc = BaseEncoder(device=a.device)
    variants: dict[str, dict[str, Any]] = {"off": {}}
    for eps in epsilons:
        variants[f"dp eps={eps:g}"] = {"dp_epsilon": eps, "dp_delta": a.delta}
    models = {}
    for name, dp in variants.items():
        m = build_model(a.model, enc, device=a.device, seed=0, publish_every_s=float("inf"), **dp)
        t = time.perf_counter()
        m.upsert_items(items)
        print(f"  {name}: built, catalog in {time.perf_counter() - t:.1f}s", flush=True)
        models[name] = m
    times: dict[str, list[float]] = {n: [] for n in models}
    batches = [events[i : i + a.batch_size] for i in range(0, len(events), a.batch_size)]
    next_report = time.perf_counter() + 15
    for k, batch in enumerate(batches):
        for name, m in models.items():
            t = time.perf_counter()
            m.learn(batch)
            times[name].append(time.perf_counter() - t)
        if time.perf_counter() > next_report:
            done = (k + 1) * a.batch_size
            spent = sum(sum(v) for v in times.values())
            eta = spent / (k + 1) * (len(batches) - k - 1)
            print(f"  {done}/{len(events)} events, eta {eta:.0f}s", flush=True)
            next_report = time.perf_counter() + 15
    base = sum(times["off"])
    print()
    print("| variant | events/s | × DP off | ms/batch p50 | ms/batch p99 | ε spent | δ | σ |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in models.items():
        ts = np.asarray(times[name])
        dp = m.privacy_state()
        eps = f"{dp['dp_epsilon']:.3f}" if dp else "-"
        delta = f"{dp['dp_delta']:.2e}" if dp else "-"
        sigma = f"{dp['dp_noise_multiplier']:.2f}" if dp else "-"
        print(
            f"| {name} | {len(events) / ts.sum():,.0f} | {base / ts.sum():.2f} | "
            f"{1000 * np.median(ts):.1f} | {1000 * np.quantile(ts, 0.99):.1f} | {eps} | {delta} | {sigma} |"
        )


if __name__ == "__main__":
    main()
