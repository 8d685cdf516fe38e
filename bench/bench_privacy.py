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

`--mia`: a membership-inference check instead. Users are split in two by a hash of
their id; each variant learns the members' events only, then the non-members' vectors
are rebuilt from their events without training, and a loss-threshold attack (mean
-log softmax of the user's own items over the catalog) tells members from non-members.
Printed: the attack's AUC per variant (0.5 = chance) and its bootstrap spread.
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
    p.add_argument("--mia", action="store_true", help="membership-inference AUC instead of speed")
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
    if a.mia:
        membership(models, events, a.batch_size)
        return
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


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(a member's score > a non-member's) (Mann-Whitney; ties count half)."""
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([members, others]))
    n, m = len(members), len(others)
    return float((r[:n].sum() - n * (n + 1) / 2) / (n * m))


def membership(models: dict[str, Any], events: list[Any], batch_size: int) -> None:
    import hashlib

    def member(user: str) -> bool:
        return hashlib.sha1(user.encode()).digest()[0] % 2 == 0

    train = [e for e in events if member(e.user_id)]
    held: dict[str, list[Any]] = {}
    for e in events:
        if not member(e.user_id):
            held.setdefault(e.user_id, []).append(e)
    print(f"membership: {len({e.user_id for e in train})} members ({len(train)} events), {len(held)} others")
    own: dict[str, list[str]] = {}
    for e in events:
        own.setdefault(e.user_id, []).append(e.item_id)
    rng = np.random.default_rng(0)
    print()
    print("| variant | attack AUC | bootstrap 95% | ε spent |")
    print("|---|---|---|---|")
    for name, m in models.items():
        t = time.perf_counter()
        for i in range(0, len(train), batch_size):
            m.learn(train[i : i + batch_size])
        for user, evs in held.items():
            m.rebuild_user(user, evs)
        index = {item: k for k, item in enumerate(m.item_ids())}

        def loss(user: str, m: Any = m, index: dict[str, int] = index) -> float:
            s = m.predict(user).astype(np.float64)
            s -= s.max()
            logp = s - np.log(np.exp(s).sum())
            return -float(np.mean([logp[index[i]] for i in own[user] if i in index]))

        members = np.array([-loss(u) for u in {e.user_id for e in train}])
        others = np.array([-loss(u) for u in held])
        boot = [auc(rng.choice(members, len(members)), rng.choice(others, len(others))) for _ in range(200)]
        dp = m.privacy_state()
        eps = f"{dp['dp_epsilon']:.3f}" if dp else "-"
        print(
            f"| {name} | {auc(members, others):.3f} | {np.quantile(boot, 0.025):.3f}–"
            f"{np.quantile(boot, 0.975):.3f} | {eps} |",
            flush=True,
        )
        print(f"  ({name}: {time.perf_counter() - t:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
