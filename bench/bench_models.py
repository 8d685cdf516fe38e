"""Throughput and peak memory of the interest-model core per strategy, on MovieLens 100K.

    python bench/bench_models.py                                # all strategies, CPU or CUDA
    python bench/bench_models.py --models decayed_mean,adapter --events 100000 --plot bench-models.png
    python bench/bench_models.py --models adapter,adapter@p10 --opt adapter@p10:publish_every_steps=10
    python bench/bench_models.py --models decayed_mean,adapter --synthetic --events 30000 --batch-size 2000 \
        --partitions 4

`--synthetic` learns the stream `bench/bench_freshness.py` feeds the worker instead (clicks and
searches of 1,000 users over 120 items, `stream.sources.synthetic_log`): what the worker's
model thread could reach on that stream if nothing else ran beside it. `--partitions N` batches
each of N groups of users apart, as the worker batches each partition under a backlog.

Each model runs in its own process (so peak memory is its own) over the same
event-time-ordered ML-100K ratings in micro-batches (`--batch-size`, the worker's
default 500), `learn` only, after the catalog is loaded (base encodings are made
once, up front, and shared, so no model pays for encoding the catalog). Printed
per model: events/s, the ratio to the untrained `decayed_mean` measured in the
same run, the time per batch, peak memory (process RSS; on CUDA also the
peak allocated GPU memory), and the size of the last published weights that stand
alone and of the last that carry only what came since a base version (the
co-occurrence checkpoint, docs/model.md). Figures on a shared machine are noisy: compare the
ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "ml-100k"

from models.finetune.options import parse_overrides  # noqa: E402
from stream.runtime import is_fine_tuned, spec_of  # noqa: E402

BASELINE = "decayed_mean"


def _load(data: Path, limit: int | None, synthetic: bool = False) -> tuple[list[Any], list[Any]]:
    from models.events import Event, Item
    from stream.schema import validate_event, validate_item
    from stream.sources import movielens_items, movielens_ratings, synthetic_log

    if synthetic:  # the freshness benchmark's workload (its `workload`, seed 1)
        records = synthetic_log(n_users=1000, n_events=limit or 30_000, seed=1)
        return (
            [validate_item(r) for r in records if r["type"] == "item"],
            [validate_event(r, r["type"]) for r in records if r["type"] != "item"],
        )

    items = [Item(r["item_id"], r["text"], r["attrs"]) for r in movielens_items(data)]
    events = [
        Event(
            r["event_id"], r["user_id"], r["ts"] / 1000.0, "rating", item_id=r["item_id"], rating=r["rating"]
        )
        for r in movielens_ratings(data, limit)
    ]
    return items, events


def _encoder(device: str, cache_file: Path | None) -> Any:
    import numpy as np

    from models.encoder import BaseEncoder

    enc = BaseEncoder(device=device)
    if cache_file is not None and cache_file.exists():
        blob = np.load(cache_file, allow_pickle=False)
        enc.cache.load(zip(blob["texts"].tolist(), blob["vectors"], strict=True))
    return enc


def _batches(events: list[Any], size: int, partitions: int) -> list[list[Any]]:
    """`size`-event batches; with several partitions, each holds one group of users (by a hash
    of the user id), in the order of their first events, as a worker's are under a backlog."""
    if partitions <= 1:
        return [events[i : i + size] for i in range(0, len(events), size)]
    groups: dict[int, list[Any]] = {}
    for e in events:
        groups.setdefault(zlib.crc32(e.user_id.encode()) % partitions, []).append(e)
    out = [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]
    return sorted(out, key=lambda b: b[0].ts)


def run_one(label: str, args: dict[str, Any], out: Any) -> None:
    """Child process: build one model, learn the stream, report figures through `out`.

    `label` is a model spec, optionally with `@name` (its `--opt` options told apart)."""
    import torch

    from models.registry import build_model

    spec = spec_of(label)

    torch.set_num_threads(args["threads"]) if args["threads"] else None
    items, events = _load(Path(args["data"]), args["events"], args["synthetic"])
    enc = _encoder(args["device"], Path(args["cache"]))
    options: dict[str, Any] = {}
    if is_fine_tuned(spec):
        options = {"device": args["device"], "seed": 0} | args["opts"].get(label, {})
    model = build_model(spec, enc, **options)
    t = time.perf_counter()
    model.upsert_items(items)
    setup_s = time.perf_counter() - t
    cuda = torch.cuda.is_available() and args["device"] != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    bs = args["batch_size"]
    batches = _batches(events, bs, args["partitions"])
    learn_s = 0.0
    n = 0
    # The published weights' sizes: a version that stands alone (a co-occurrence checkpoint, or
    # any version of a model without one) and one that names a base and carries what came since.
    whole_mb: list[float] = []
    delta_mb: list[float] = []
    next_report = time.perf_counter() + 15
    for batch in batches:
        t = time.perf_counter()
        result = model.learn(batch)
        if cuda:
            torch.cuda.synchronize()
        learn_s += time.perf_counter() - t
        snap = result.snapshot
        if snap is not None and snap.weights:
            (delta_mb if snap.weights_base else whole_mb).append(len(snap.weights) / 1e6)
        n += len(batch)
        if time.perf_counter() > next_report:
            rate = n / learn_s
            eta = (len(events) - n) / rate
            print(f"  {label}: {n}/{len(events)} events, {rate:,.0f} ev/s, eta {eta:.0f}s", flush=True)
            next_report = time.perf_counter() + 15
    t = time.perf_counter()
    users = list(model.known_users())[:500]
    for u in users:
        model.predict(u)
    predict_s = time.perf_counter() - t
    out.put(
        {
            "model": label,
            "events": n,
            "batches": len(batches),
            "learn_s": learn_s,
            "events_per_s": n / learn_s if learn_s else float("inf"),
            "ms_per_batch": 1000 * learn_s / max(1, len(batches)),
            "predict_users_per_s": len(users) / predict_s if predict_s else float("inf"),
            "setup_s": setup_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "weights_whole_mb": whole_mb[-1] if whole_mb else None,
            "weights_delta_mb": delta_mb[-1] if delta_mb else None,
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--models", default="decayed_mean,adapter,top_layers:1,lora:8")
    p.add_argument("--events", type=int, default=20_000, help="events per model (0 = all 100,000)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--partitions", type=int, default=1, help="batch this many groups of users apart")
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="the freshness benchmark's synthetic stream instead of ML-100K",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        help="LABEL:FIELD=JSON, a FineTuneOptions field for the model LABEL (a spec, optionally "
        "with @name: --models adapter,adapter@p10 --opt adapter@p10:publish_every_steps=10)",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--plot", type=Path, help="write a PNG bar chart of events/s here")
    a = p.parse_args()
    if not a.synthetic and not (a.data / "u.data").is_file():
        sys.exit(f"bench_models: {a.data} is not a MovieLens 100K folder")
    specs = [s.strip() for s in a.models.split(",") if s.strip()]
    try:
        opts = parse_overrides(a.opt, [x for x in specs if is_fine_tuned(x)])
    except ValueError as exc:
        p.error(str(exc))
    if BASELINE not in specs:
        specs.insert(0, BASELINE)

    import numpy as np
    import torch

    from models.catalog import item_text

    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"bench_models: {platform.node()} python {platform.python_version()} torch {torch.__version__} "
        f"device {device} ({torch.cuda.get_device_name(0) if device == 'cuda' else os.cpu_count()} "
        f"{'GPU' if device == 'cuda' else 'CPU cores'}), {torch.get_num_threads()} threads, "
        f"batch {a.batch_size}, events {a.events or 'all'}",
        flush=True,
    )
    # Encode the catalog once; every model process starts from this cache.
    items, _ = _load(a.data, 1, a.synthetic)
    enc = _encoder(device, None)
    t = time.perf_counter()
    texts = [item_text(i.text, i.attrs) for i in items]
    vecs = enc.encode(texts, progress=True)
    print(f"catalog: {len(texts)} items encoded in {time.perf_counter() - t:.1f}s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "enc.npz"
        np.savez(cache, texts=np.asarray(texts), vectors=vecs)
        args = {
            "data": str(a.data),
            "events": a.events or None,
            "batch_size": a.batch_size,
            "device": device,
            "cache": str(cache),
            "threads": a.threads,
            "synthetic": a.synthetic,
            "partitions": a.partitions,
            "opts": opts,
        }
        ctx = mp.get_context("spawn")
        results = []
        for spec in specs:
            q = ctx.Queue()
            proc = ctx.Process(target=run_one, args=(spec, args, q))
            proc.start()
            res = q.get()
            proc.join()
            results.append(res)
            print(
                f"  {spec}: {res['events_per_s']:,.0f} ev/s, peak RSS {res['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    base = next(r for r in results if r["model"] == BASELINE)
    print()
    print(
        f"| model | events/s | × {BASELINE} | ms/batch | predict users/s | peak RSS MiB | peak GPU MiB "
        "| weights MB, whole / since a base |"
    )
    print("|---|---|---|---|---|---|---|---|")

    def mb(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    for r in results:
        r["ratio_to_untrained"] = r["events_per_s"] / base["events_per_s"]
        gpu = f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "-"
        print(
            f"| {r['model']} | {r['events_per_s']:,.0f} | {r['ratio_to_untrained']:.4f} | "
            f"{r['ms_per_batch']:.1f} | {r['predict_users_per_s']:,.0f} | {r['peak_rss_mib']:.0f} | {gpu} "
            f"| {mb(r['weights_whole_mb'])} / {mb(r['weights_delta_mb'])} |"
        )
    if a.json:
        a.json.write_text(
            json.dumps({"device": device, "batch_size": a.batch_size, "results": results}, indent=2)
        )
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar([r["model"] for r in results], [r["events_per_s"] for r in results], color="#4c72b0")
        ax.set_yscale("log")
        ax.set_ylabel("events/s (log)")
        stream = "synthetic" if a.synthetic else "ML-100K"
        ax.set_title(f"interest-model learn throughput, {stream}, {device}, batch {a.batch_size}")
        for x, r in enumerate(results):
            ax.text(x, r["events_per_s"], f"{r['events_per_s']:,.0f}", ha="center", va="bottom", fontsize=8)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
