"""The demo's genre burst through the models alone (no broker, no Postgres), to see why it moves
what it moves.

    python scripts/demo_shift.py --events 5000
    python scripts/demo_shift.py --events 50000 --batch-size 500

Learns the first N MovieLens 100K ratings (the demo's sample) in micro-batches with the default
model and `item_knn`, picks the demo's user (fewest events, at least 5) and genre, then learns
the demo's burst of 20 five-star ratings. For each model, before and after: the user's top 5
(unseen items) with each score split into the interest part (the dot product of the vectors'
interest dimensions) and the bias part (the last dimension: popularity and item biases), the
norm of the user's interest part, and the median rank of the genre's other items.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.core import Event, InterestModel, Item  # noqa: E402
from models.registry import build_model  # noqa: E402
from stream.backtest.models import LazyEncoder  # noqa: E402
from stream.demo import (  # noqa: E402
    BURST,
    MIN_HISTORY,
    burst_records,
    genres_of,
    median_rank_of,
    pick_shift,
    sample_records,
)
from stream.runtime import build_interest_model  # noqa: E402
from stream.schema import parse_log_record  # noqa: E402
from stream.settings import Settings  # noqa: E402


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ml-100k")
    ap.add_argument("--events", type=positive, default=20000, help="ratings learned before the burst")
    ap.add_argument("--batch-size", type=positive, default=500)
    ap.add_argument("--cache", type=Path, default=ROOT / ".istream" / "encodings")
    a = ap.parse_args()
    try:
        records, _ = sample_records(a.data, a.events)
    except click.ClickException as exc:  # the demo's own check of the folder
        sys.exit(f"demo_shift: {exc.message}")
    catalog = [r for r in records if "user_id" not in r]
    events_raw = [r for r in records if "user_id" in r]
    items = [parse_log_record(r) for r in catalog]
    events: list[Event] = sorted((parse_log_record(r) for r in events_raw), key=lambda e: e.ts)  # type: ignore[misc]
    genres = {r["item_id"]: genres_of(r) for r in catalog}
    titles = {it.item_id: it.text for it in items if isinstance(it, Item)}

    settings = Settings()
    encoder = LazyEncoder(settings, a.cache)
    models: dict[str, InterestModel] = {
        settings.model: build_interest_model(settings, encoder),  # type: ignore[arg-type]
        "item_knn": build_model("item_knn", encoder),  # type: ignore[arg-type]
    }
    for m in models.values():
        m.upsert_items([it for it in items if isinstance(it, Item)])
    for i in range(0, len(events), a.batch_size):
        for m in models.values():
            m.learn(events[i : i + a.batch_size])

    n = Counter(e.user_id for e in events)
    eligible = [u for u in n if n[u] >= MIN_HISTORY]
    if not eligible:
        sys.exit(f"demo_shift: no user has {MIN_HISTORY} events in the first {a.events}; ask for more")
    user = min(eligible, key=lambda u: (n[u], u))
    genre, burst_items = pick_shift(user, catalog, events_raw)
    seen = {e.target_item for e in events if e.user_id == user}
    print(f"{a.events} events learned; user {user} ({n[user]} events), a burst of {BURST} {genre} ratings")

    def show(when: str) -> None:
        for name, m in models.items():
            ids = list(m.item_ids())
            vec = m.user_vector(user)
            if name == "item_knn" or vec is None:
                scores, parts, norm = m.predict(user), None, float("nan")
            else:
                matrix = m.item_matrix()
                scores = matrix @ vec
                parts = (matrix[:, :-1] @ vec[:-1], matrix[:, -1] * vec[-1])
                norm = float(np.linalg.norm(vec[:-1]))
            assert scores is not None
            others = {i for i in ids if genre in genres.get(i, []) and i not in seen}
            median = median_rank_of(scores, ids, others)
            print(f"  {name} {when}: {genre} median rank {median:.0f}, interest norm {norm:.2f}")
            unseen = [j for j in np.argsort(-scores, kind="stable") if ids[j] not in seen][:5]
            for j in unseen:
                split = "" if parts is None else f"  (interest {parts[0][j]:6.3f}, bias {parts[1][j]:6.3f})"
                mark = "*" if genre in genres.get(ids[j], []) else " "
                print(f"    {mark} {scores[j]:7.3f}{split}  {titles.get(ids[j], ids[j])[:48]}")

    show("before")
    last = max(e.ts for e in events if e.user_id == user)
    burst = [parse_log_record(r) for r in burst_records(user, burst_items, last)]
    for m in models.values():
        m.learn(burst)  # type: ignore[arg-type]
    seen |= set(burst_items)
    show("after")


if __name__ == "__main__":
    main()
