"""Recovery after an interest switch, with and without drift detection, in one run.

    python bench/bench_drift.py                       # synthetic log, every user switches topic halfway
    python bench/bench_drift.py --users 60 --events 8000 --plot drift.png

The synthetic log (`stream.sources.synthetic_log`) has every user move to another
topic after half the events. The same model (`adapter` by default, the packaged
base) runs twice in one backtest, with `drift` on and off (river's ADWIN on the
prequential loss: a learning-rate boost on a global drift, a user's attention
window cut to their newest behaviours on theirs). Printed: Recall@10 per
micro-batch around the switch, and the number of batches after the switch until
the rolling Recall@10 (5 batches) is back at 90% of its level before the switch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def batches_to_recover(recall: np.ndarray, batch: np.ndarray, switch: int, level: float) -> int | None:
    """Micro-batches after the switch until the rolling (5-batch) recall is back at `level`."""
    after = sorted(set(batch[batch >= switch].tolist()))
    per = {b: recall[batch == b].mean() for b in after}
    for k in range(len(after)):
        window = [per[b] for b in after[max(0, k - 4) : k + 1]]
        if len(window) == 5 and np.mean(window) >= level:
            return int(after[k] - switch)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="adapter")
    p.add_argument("--users", type=int, default=40)
    p.add_argument("--events", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--plot", type=Path, help="write a PNG of Recall@10 per batch here")
    a = p.parse_args()

    from models.metrics import ranking_metrics
    from stream.backtest import BacktestConfig, from_records, run_backtest
    from stream.backtest.models import LazyEncoder
    from stream.runtime import build_interest_model
    from stream.settings import Settings
    from stream.sources import synthetic_log

    data = from_records(synthetic_log(n_users=a.users, n_events=a.events, switch_at=0.5, seed=0))
    settings = Settings(model=a.model, device="cpu", model_publish_every_s=float("inf"))
    encoder = LazyEncoder(settings)
    models = {}
    for label, drift in (("drift on", True), ("drift off", False)):
        m = build_interest_model(settings, encoder)  # type: ignore[arg-type]
        m.trainer.opts.drift = drift  # type: ignore[attr-defined]
        models[label] = m
    res = run_backtest(models, data, BacktestConfig(batch_size=a.batch_size, progress=True))
    batch = res.position // a.batch_size
    switch = (len(data.events) // 2) // a.batch_size
    print(f"{len(data.events)} events, {a.users} users, switch at batch {switch} (batches of {a.batch_size})")
    curves = {}
    for label in models:
        r10 = ranking_metrics(res.greater[label], res.ties[label])["recall@10"]
        pre = r10[(batch >= switch - 10) & (batch < switch)].mean()
        rec = batches_to_recover(r10, batch, switch, 0.9 * pre)
        drifts = models[label].trainer.drift.stats  # type: ignore[attr-defined]
        print(
            f"{label:9s}  Recall@10 before the switch {pre:.3f}; batches to recover 90%: "
            f"{rec if rec is not None else 'never'}; drifts detected: global {drifts.global_drifts}, "
            f"users {drifts.user_drifts}"
        )
        curves[label] = [
            r10[batch == b].mean() if (batch == b).any() else np.nan for b in range(batch.max() + 1)
        ]
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        for label, c in curves.items():
            ax.plot(c, label=label)
        ax.axvline(switch, color="grey", linestyle="--", label="interest switch")
        ax.set_xlabel(f"micro-batch ({a.batch_size} events)")
        ax.set_ylabel("Recall@10")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
