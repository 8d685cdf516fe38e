"""Freshness and throughput of the stream path, on embedded servers, against baselines in the same run.

Prints:
- the rate of a bare kafka-python consumer and of a Faust agent that only counts,
  each reading the same pre-filled backlog;
- the sustained end-to-end rate of `istream worker` on that backlog (events/s
  from its first commit to the last event visible in SQL), with --model;
- p50/p99 seconds from produce to the vector visible in SQL while producing at
  fixed rates (default 100 and 1,000 events/s, one minute each).

    python bench/bench_freshness.py                      # decayed_mean, 1 min per rate
    python bench/bench_freshness.py --model adapter --duration 60 --rates 100,1000

Writes bench/out/freshness-<model>.png (freshness CDFs, freshness over time, the rates) and keeps
the live worker's log beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from storage.db import make_engine  # noqa: E402
from stream.broker import env_without_proxies, make_consumer, make_producer  # noqa: E402
from stream.runtime import published_dim  # noqa: E402
from stream.servers import Servers  # noqa: E402
from stream.settings import Settings  # noqa: E402
from stream.sources import synthetic_log  # noqa: E402

OUT = ROOT / "bench" / "out"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- workload -----------------------------------------------------------------------------
def workload(n_events: int, n_users: int, seed: int, prefix: str) -> tuple[list[dict], list[dict]]:
    records = synthetic_log(n_users=n_users, n_events=n_events, seed=seed)
    items = [r for r in records if r["type"] == "item"]
    events = [r for r in records if r["type"] != "item"]
    for e in events:
        e["event_id"] = f"{prefix}-{e['event_id']}"
    return items, events


def send(producer: Any, s: Settings, record: dict) -> None:
    kind = record["type"]
    key = record["item_id"] if kind == "item" else record["user_id"]
    producer.send(s.topic_for_kind(kind), key=key.encode(), value=json.dumps(record).encode())


# ---- baselines ----------------------------------------------------------------------------
def bare_consumer_rate(bootstrap: str, s: Settings, n: int) -> float:
    consumer = make_consumer(
        bootstrap, *s.event_topics, group_id=f"bench-bare-{uuid.uuid4().hex[:6]}", consumer_timeout_ms=30000
    )
    seen = 0
    first = 0.0
    for _ in consumer:
        if seen == 0:
            first = time.perf_counter()
        seen += 1
        if seen >= n:
            break
    elapsed = time.perf_counter() - first
    consumer.close()
    return (seen - 1) / elapsed if seen > 1 else 0.0


FAUST_COUNTER = """
import sys, time, os, faust
bootstrap, group, n, topics = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(',')
app = faust.App(group, broker=f'kafka://{bootstrap}', store='memory://', web_enabled=False,
                topic_allow_declare=False, topic_disable_leader=True, consumer_auto_offset_reset='earliest',
                broker_session_timeout=10.0, broker_heartbeat_interval=1.0)
topic = app.topic(*topics, key_serializer='raw', value_serializer='raw', allow_empty=True)
state = {'n': 0, 't0': 0.0}
@app.agent(topic)
async def count(stream):
    async for _ in stream.events():
        if state['n'] == 0:
            state['t0'] = time.perf_counter()
        state['n'] += 1
        if state['n'] >= n:
            print('RATE', (n - 1) / (time.perf_counter() - state['t0']), flush=True)
            os._exit(0)
faust.Worker(app, loglevel='WARNING', quiet=True, redirect_stdouts=False).execute_from_commandline()
"""


def faust_counter_rate(bootstrap: str, s: Settings, n: int, tmp: Path) -> float:
    script = tmp / "faust_counter.py"
    script.write_text(FAUST_COUNTER)
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            bootstrap,
            f"bench-faust-{uuid.uuid4().hex[:6]}",
            str(n),
            ",".join(s.event_topics),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env_without_proxies(),
        cwd=tmp,
    )
    found = re.search(r"RATE ([0-9.]+)", out.stdout)  # Faust's worker may prefix terminal codes
    if found:
        return float(found.group(1))
    raise RuntimeError(f"the Faust counter failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


# ---- the worker ---------------------------------------------------------------------------
class Worker:
    def __init__(
        self,
        bootstrap: str,
        db_url: str,
        model: str,
        batch_seconds: float,
        batch_size: int,
        tmp: Path,
        group: str = "interest-stream",
    ) -> None:
        env = {
            **env_without_proxies(),
            "ISTREAM_GROUP_ID": group,
            "ISTREAM_KAFKA_BOOTSTRAP": bootstrap,
            "ISTREAM_DATABASE_URL": db_url,
            "ISTREAM_MODEL": model,
            "ISTREAM_METRICS_PORT": "0",
            "ISTREAM_BATCH_SECONDS": str(batch_seconds),
            "ISTREAM_BATCH_SIZE": str(batch_size),
            "ISTREAM_LOG_LEVEL": os.environ.get("ISTREAM_LOG_LEVEL", "WARNING"),
            "PYTHONPATH": str(ROOT),
        }
        self.log_path = tmp / "worker.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "worker"],
            env=env,
            cwd=ROOT,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def fresh_database(url: str, name: str, dim: int) -> str:
    """Another migrated database on the same server: a repeat starts from nothing."""
    from sqlalchemy.engine import make_url

    from storage.db import upgrade

    admin = make_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    new = make_url(url).set(database=name).render_as_string(hide_password=False)
    upgrade(new, vector_dim=dim)
    return new


def applied(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM applied_events")).scalar_one())


def catalog_size(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM items")).scalar_one())


def end_to_end_rate(engine: Any, worker: Worker, n: int, n_items: int, timeout: float = 900) -> float:
    """Events/s from the worker's first commit after the catalog is in, until all n backlog
    events are visible in SQL. Encoding a new catalog is one-off work, not event throughput
    (120 new items took the worker ~3 s on a busy machine), so the clock starts after it."""
    deadline = time.monotonic() + timeout
    start_n, start_t = 0, 0.0
    last_report = time.monotonic()
    while True:
        worker.check()
        got = applied(engine)
        now = time.perf_counter()
        if got > 0 and start_t == 0.0 and catalog_size(engine) >= n_items:
            start_n, start_t = got, now
        if got >= n:
            return (got - start_n) / (now - start_t) if now > start_t else float("nan")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{got}/{n} applied after {timeout:.0f}s")
        if time.monotonic() - last_report > 10:
            rate = (got - start_n) / (now - start_t) if start_t else 0.0
            eta = (n - got) / rate if rate else float("nan")
            log(f"  backlog: {got}/{n} applied, {rate:.0f} ev/s, ETA {eta:.0f}s")
            last_report = time.monotonic()
        time.sleep(0.05)


def freshness_at(
    bootstrap: str, s: Settings, engine: Any, worker: Worker, events: list[dict], rate: float, duration: float
) -> tuple[np.ndarray, np.ndarray]:
    """Produce at `rate` for `duration` s; per event, when it was sent (seconds into the run) and
    the seconds from its send to its event being visible in SQL."""
    producer = make_producer(bootstrap, linger_ms=0)
    sent: dict[str, float] = {}
    lock = threading.Lock()
    n_total = min(int(rate * duration), len(events))
    done = threading.Event()

    def produce() -> None:
        t0 = time.perf_counter()
        for i, e in enumerate(events[:n_total]):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            with lock:
                sent[e["event_id"]] = time.perf_counter()
            send(producer, s, e)
        producer.flush()
        done.set()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    latencies: list[float] = []
    sent_at: list[float] = []
    pending: dict[str, float] = {}
    started = time.perf_counter()
    last_report = time.monotonic()
    deadline = time.monotonic() + duration + 60
    while time.monotonic() < deadline:
        with lock:
            pending.update(sent)
            sent.clear()
        if pending:
            with engine.connect() as conn:
                seen = conn.execute(
                    text("SELECT event_id FROM applied_events WHERE event_id = ANY(:ids)"),
                    {"ids": list(pending)},
                ).scalars()
                now = time.perf_counter()
                for eid in seen:
                    t = pending.pop(eid)
                    latencies.append(now - t)
                    sent_at.append(t - started)
        if done.is_set() and not pending and len(latencies) >= n_total:
            break
        if time.monotonic() - last_report > 15:
            log(f"  {rate:g} ev/s: {len(latencies)}/{n_total} visible, {len(pending)} in flight")
            last_report = time.monotonic()
        worker.check()
        time.sleep(0.02)
    producer.close()
    if len(latencies) < n_total:
        log(f"  NOT SUSTAINED: {len(latencies)}/{n_total} visible 60s after producing ended")
        # The rest waited at least until now: count them at what they have waited so far.
        now = time.perf_counter()
        with lock:
            pending.update(sent)
        latencies.extend(now - t for t in pending.values())
        sent_at.extend(t - started for t in pending.values())
    return np.asarray(sent_at), np.asarray(latencies)


def plot(
    results: dict[float, np.ndarray], sent: dict[float, np.ndarray], rates: dict[str, float], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, c, b) = plt.subplots(1, 3, figsize=(16, 4))
    # Over time: slow events in periodic bursts (a recurring task) or drifting up (falling behind).
    for rate, lat in results.items():
        c.plot(sent[rate], lat, ".", ms=2, label=f"{rate:g} ev/s")
    c.axhline(2.0, color="grey", ls="--", lw=1)
    c.set_xlabel("seconds into the run (send time)")
    c.set_ylabel("seconds to visible in SQL")
    c.set_title("freshness over time")
    c.legend()
    for rate, lat in results.items():
        xs = np.sort(lat)
        a.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=f"{rate:g} ev/s")
    a.axvline(2.0, color="grey", ls="--", lw=1, label="2 s target (p99 at 100 ev/s)")
    a.set_xscale("log")
    a.set_xlabel("seconds from produce to vector visible in SQL (log scale)")
    a.set_ylabel("fraction of events")
    a.set_title("freshness")
    a.legend()
    b.barh(list(rates), list(rates.values()))
    b.set_xscale("log")
    b.set_xlabel("events/s on a backlog (log scale)")
    b.set_title("throughput, same run")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="decayed_mean", help="ISTREAM_MODEL for the worker")
    ap.add_argument("--backlog", type=int, default=30000, help="events pre-filled for the rate measurements")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--rates", default="100,1000", help="produce rates for freshness, events/s")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of producing per rate")
    ap.add_argument("--batch-seconds", type=float, default=Settings().batch_seconds)
    ap.add_argument("--batch-size", type=int, default=Settings().batch_size)
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure counting agent and worker this many times, interleaved (the ratio is the median "
        "of the pairs: on a shared machine the load moves between runs)",
    )
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    rates = [float(r) for r in args.rates.split(",") if r]

    log(f"{os.cpu_count()} CPUs; model {args.model}; backlog {args.backlog}; rates {rates}")
    with tempfile.TemporaryDirectory(prefix="istream-bench-") as tmpdir:
        tmp = Path(tmpdir)
        # The model decides the width the embedded database is migrated with.
        s = Settings(kafka_bootstrap=None, database_url=None, data_dir=tmp, model=args.model)
        with Servers(s) as ep:
            engine = make_engine(ep.database_url)
            items, backlog = workload(args.backlog, args.users, seed=1, prefix="backlog")
            producer = make_producer(ep.bootstrap, linger_ms=20)
            for r in items + backlog:
                send(producer, s, r)
            producer.flush()
            producer.close()
            log(f"pre-filled {len(backlog)} events and {len(items)} items")

            bare = bare_consumer_rate(ep.bootstrap, s, len(backlog))
            log(f"bare kafka-python consumer: {bare:,.0f} ev/s")
            pairs: list[tuple[float, float]] = []
            for k in range(args.repeat - 1):  # the last pair is measured below, with the live worker
                c = faust_counter_rate(ep.bootstrap, s, len(backlog), tmp)
                url = fresh_database(ep.database_url, f"repeat{k}", published_dim(s))
                eng = make_engine(url)
                w = Worker(
                    ep.bootstrap, url, args.model, args.batch_seconds, args.batch_size, tmp, f"repeat-{k}"
                )
                try:
                    pairs.append((c, end_to_end_rate(eng, w, len(backlog), len(items))))
                finally:
                    w.stop()
                    eng.dispose()
                log(f"repeat {k + 1}: counting {c:,.0f} ev/s, worker {pairs[-1][1]:,.0f} ev/s")
            counting = faust_counter_rate(ep.bootstrap, s, len(backlog), tmp)
            log(f"Faust agent that only counts: {counting:,.0f} ev/s")

            worker = Worker(
                ep.bootstrap, ep.database_url, args.model, args.batch_seconds, args.batch_size, tmp
            )
            try:
                e2e = end_to_end_rate(engine, worker, len(backlog), len(items))
                pairs.append((counting, e2e))
                log(f"istream worker ({args.model}), end to end: {e2e:,.0f} ev/s")
                fresh: dict[float, np.ndarray] = {}
                sent: dict[float, np.ndarray] = {}
                for i, rate in enumerate(rates):
                    n = int(rate * args.duration)
                    _, live = workload(n, args.users, seed=10 + i, prefix=f"live{i}")
                    log(f"producing {n} events at {rate:g} ev/s for {args.duration:.0f}s…")
                    sent[rate], fresh[rate] = freshness_at(
                        ep.bootstrap, s, engine, worker, live, rate, args.duration
                    )
                    p50, p99 = np.percentile(fresh[rate], [50, 99])
                    log(f"  {rate:g} ev/s: p50 {p50:.3f}s  p99 {p99:.3f}s  max {fresh[rate].max():.3f}s")
            finally:
                worker.stop()
                # The live worker's log, kept: what it did when the slow events were slow.
                OUT.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(worker.log_path, OUT / f"freshness-{args.model}-worker.log")
            engine.dispose()

    print()
    print(
        f"model: {args.model}   CPUs: {os.cpu_count()}   batch_size: {args.batch_size}   "
        f"batch_seconds: {args.batch_seconds}   load average at end: {os.getloadavg()[0]:.1f}"
    )
    title = f"throughput on a backlog of {args.backlog} events"
    print(f"{title:<48} {'events/s':>10} {'vs Faust':>9}")
    table = {
        "bare kafka-python consumer": bare,
        "Faust agent, counting only": counting,
        f"istream worker ({args.model})": e2e,
    }
    for name, r in table.items():
        print(f"{name:<48} {r:>10,.0f} {r / counting:>8.2f}x")
    if len(pairs) > 1:
        ratios = sorted(w / c for c, w in pairs)
        each = ", ".join(f"{w:,.0f}/{c:,.0f}" for c, w in pairs)
        med = np.median(ratios)
        print(f"worker/counting over {len(pairs)} interleaved pairs ({each}): median {med:.2f}x")
    print()
    print(f"{'freshness, produce -> vector visible in SQL':<48} {'p50 s':>8} {'p99 s':>8} {'max s':>8}")
    for rate, lat in fresh.items():
        p50, p99 = np.percentile(lat, [50, 99])
        label = f"{rate:g} events/s for {args.duration:.0f}s ({len(lat)} events)"
        print(f"{label:<48} {p50:>8.3f} {p99:>8.3f} {lat.max():>8.3f}")
    path = OUT / f"freshness-{args.model}.png"
    plot(fresh, sent, table, path)
    print(f"\nplot: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
