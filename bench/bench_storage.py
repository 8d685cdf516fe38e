"""Storage benchmark: versioned writes, current-vector lookups, top-k items, sizes.

    python bench/bench_storage.py                       # 100k users, 10k items, 384-d, embedded PG18+pgvector
    python bench/bench_storage.py --users 20000 --rounds 1 --server pg15   # the real[] fallback

Prints figures (and writes bench/out/storage.png). Targets from issue 4, on 2 cores:
>= 20,000 versions/s written, current lookup p99 < 5 ms, top-10 p99 < 50 ms with the index.
Random unit vectors stand in for model output: storage cost does not depend on what they mean.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import psycopg
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.core import UserUpdate
from models.events import Event
from storage.db import EmbeddedPostgres, libpq_url, make_engine, upgrade
from storage.repository import OffsetMark, VectorStore


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Vectors:
    """Unit vectors around `topics` random centres (like real embeddings, which cluster by topic),
    or uniformly random with topics=0 (the hardest case for an approximate index)."""

    def __init__(self, rng: np.random.Generator, dim: int, topics: int) -> None:
        self.rng, self.dim = rng, dim
        self.centres = unit_rows(rng, topics, dim) if topics else None

    def __call__(self, n: int) -> np.ndarray:
        noise = unit_rows(self.rng, n, self.dim)
        if self.centres is None:
            return noise
        v = self.centres[self.rng.integers(0, len(self.centres), n)] + 0.8 * noise
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def server_cpu_s(url: str) -> float | None:
    """CPU seconds used so far by the server's processes (postmaster and children), when local."""
    try:
        import psutil

        with psycopg.connect(libpq_url(url)) as conn:
            backend = psutil.Process(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        postmaster = backend.parent()
        total = 0.0
        for proc in [postmaster, *postmaster.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total
    except Exception:  # a remote server (--url): no CPU figure
        return None


def percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def timed(conn: psycopg.Connection, sql: str, params_list: list[tuple], label: str) -> list[float]:
    out = []
    for params in tqdm(params_list, desc=label, unit="q", leave=False):
        t0 = time.perf_counter()
        conn.execute(sql, params).fetchall()
        out.append(time.perf_counter() - t0)
    return out


def start_server(kind: str, stack: ExitStack, url: str | None) -> str:
    if url:
        return url
    root = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    if kind == "pg15":
        from tests.plain_postgres import PlainPostgres

        server = PlainPostgres(root / "pg15", port=54316)
        admin = server.start()
        stack.callback(server.stop)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench")
        return server.url_for("bench")
    pg = EmbeddedPostgres(root / "data", database="bench")
    stack.enter_context(pg)
    return pg.url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=3, help="versions written per user")
    ap.add_argument("--batch", type=int, default=5000, help="users per commit_batch transaction")
    ap.add_argument("--events", type=int, default=0, help="applied events per user update")
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--topk", type=int, default=300, help="top-10 queries with the index")
    ap.add_argument("--topk-exact", type=int, default=60, help="top-10 queries without the index")
    ap.add_argument("--similar", type=int, default=10, help="similar_users calls (exact scan of all users)")
    ap.add_argument("--topics", type=int, default=200, help="vector clusters; 0 = uniform random")
    ap.add_argument("--server", choices=["embedded", "pg15"], default="embedded")
    ap.add_argument("--url", help="an existing, empty database instead of a fresh server")
    ap.add_argument("--plot", type=Path, default=Path(__file__).parent / "out" / "storage.png")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    make_vectors = Vectors(rng, args.dim, args.topics)
    figures: dict[str, float] = {}

    with ExitStack() as stack:
        t0 = time.perf_counter()
        url = start_server(args.server, stack, args.url)
        upgrade(url, vector_dim=args.dim)
        engine = make_engine(url, pool_size=2)
        stack.callback(engine.dispose)
        store = VectorStore(engine, group_id="bench")
        ready_s = time.perf_counter() - t0
        print(
            f"server {args.server} ({store.backend.value}, {args.dim}-d, "
            f"{args.topics or 'no'} topic clusters) ready in {ready_s:.1f}s"
        )

        # Items: one model version, as a worker publishes it (the HNSW index is maintained on insert).
        item_ids = [f"item-{i}" for i in range(args.items)]
        items = make_vectors(args.items)
        t0 = time.perf_counter()
        for lo in tqdm(range(0, args.items, 2000), desc="items", unit="batch"):
            store.write_item_vectors("m1", item_ids[lo : lo + 2000], items[lo : lo + 2000])
        figures["item_write_s"] = time.perf_counter() - t0
        how = "HNSW index maintained on insert" if store.backend.value == "pgvector" else "no index"
        print(f"items: {args.items} written in {figures['item_write_s']:.1f}s ({how})")

        # Versions: rounds x users, in batches of --batch users, one transaction each.
        users = [f"user-{u:06d}" for u in range(args.users)]
        total = args.rounds * args.users
        written = 0
        write_s = 0.0
        first_round_s = 0.0
        bar = tqdm(total=total, desc="versions", unit="ver", smoothing=0.1)
        cpu_server0, cpu_client = server_cpu_s(url), 0.0
        event_no = 0
        for rnd in range(args.rounds):
            order = list(users)
            random.Random(rnd).shuffle(order)  # batches mix users as partitions would
            for lo in range(0, args.users, args.batch):
                chunk = order[lo : lo + args.batch]
                vecs = make_vectors(len(chunk))
                now = time.time()
                updates = {
                    u: UserUpdate(user_id=u, vector=v, n_applied=1, last_event_ts=now)
                    for u, v in zip(chunk, vecs, strict=True)
                }
                events = []
                for u in chunk:
                    for _ in range(args.events):
                        event_no += 1
                        item = item_ids[event_no % args.items]
                        events.append(Event(f"ev-{event_no}", u, now, "rating", item_id=item, rating=4.0))
                t, c = time.perf_counter(), time.process_time()
                store.commit_batch("m1", updates, events, offsets=[OffsetMark("interest.ratings", 0, lo)])
                dt = time.perf_counter() - t
                cpu_client += time.process_time() - c
                write_s += dt
                if rnd == 0:
                    first_round_s += dt
                written += len(chunk)
                bar.update(len(chunk))
                bar.set_postfix(rate=f"{written / write_s:,.0f}/s")
        bar.close()
        cpu_server1 = server_cpu_s(url)
        figures["versions_per_s"] = written / write_s
        figures["insert_versions_per_s"] = args.users / first_round_s
        later = total - args.users
        if later:
            figures["update_versions_per_s"] = later / (write_s - first_round_s)
        print(
            f"versions: {written:,} in {write_s:.1f}s = {figures['versions_per_s']:,.0f}/s "
            f"(first version of each user {figures['insert_versions_per_s']:,.0f}/s"
            + (f", later versions {figures['update_versions_per_s']:,.0f}/s)" if later else ")")
        )

        if cpu_server0 is not None and cpu_server1 is not None:
            # Wall-clock rates swing with whatever else runs on a shared machine; CPU time per
            # version does not. One writer runs client and server work in turn, so on an idle
            # machine a batch takes about client CPU + server CPU.
            cpu_server = cpu_server1 - cpu_server0
            figures["cpu_bound_versions_per_s"] = written / (cpu_client + cpu_server)
            print(
                f"CPU per 1,000 versions: client {1000 * cpu_client / written * 1000:.1f} ms, "
                f"server {1000 * cpu_server / written * 1000:.1f} ms -> "
                f"{figures['cpu_bound_versions_per_s']:,.0f} versions/s if nothing else ran"
            )

        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
            sample = [(u,) for u in random.Random(1).sample(users, min(args.lookups, args.users))]
            lookup = timed(
                conn,
                "SELECT version, vector FROM user_interests_current WHERE user_id = %s",
                sample,
                "lookups",
            )
            figures["lookup_p50_ms"], figures["lookup_p99_ms"] = percentiles(lookup)
            p50, p99 = figures["lookup_p50_ms"], figures["lookup_p99_ms"]
            print(f"current lookup: p50 {p50:.2f} ms, p99 {p99:.2f} ms")

            top_users = [(u, 10) for u in random.Random(2).sample(users, args.topk)]
            # Warm-up: the first calls plan the function and pull the index into memory.
            for params in top_users[:20]:
                conn.execute("SELECT * FROM user_top_items(%s, %s)", params).fetchall()
            topk = timed(conn, "SELECT * FROM user_top_items(%s, %s)", top_users, "top-10 (index)")
            figures["top10_p50_ms"], figures["top10_p99_ms"] = percentiles(topk)
            label = "index" if store.backend.value == "pgvector" else "no index (real[] fallback)"
            p50, p99 = figures["top10_p50_ms"], figures["top10_p99_ms"]
            print(f"top-10 ({label}): p50 {p50:.1f} ms, p99 {p99:.1f} ms")
            if store.backend.value == "pgvector" and args.topk_exact:
                exact_users = top_users[: args.topk_exact]
                approx = {
                    u: {r[0] for r in conn.execute("SELECT * FROM user_top_items(%s, %s)", (u, k))}
                    for u, k in exact_users
                }
                conn.execute("SET enable_indexscan = off")  # same function, exact scan + top-N sort
                exact_t = timed(conn, "SELECT * FROM user_top_items(%s, %s)", exact_users, "top-10 (exact)")
                recall = np.mean(
                    [
                        len(
                            approx[u]
                            & {r[0] for r in conn.execute("SELECT * FROM user_top_items(%s, %s)", (u, k))}
                        )
                        / k
                        for u, k in exact_users
                    ]
                )
                conn.execute("RESET enable_indexscan")
                figures["top10_exact_p50_ms"], figures["top10_exact_p99_ms"] = percentiles(exact_t)
                figures["hnsw_recall_at_10"] = float(recall)
                print(
                    f"top-10 (no index, exact): p50 {figures['top10_exact_p50_ms']:.1f} ms, "
                    f"p99 {figures['top10_exact_p99_ms']:.1f} ms; HNSW recall@10 vs exact {recall:.3f}"
                )
            if args.similar:
                sim_users = [(u, 10) for u in random.Random(3).sample(users, args.similar)]
                sim = timed(conn, "SELECT * FROM similar_users(%s, %s)", sim_users, "similar users")
                figures["similar_p50_ms"], figures["similar_p99_ms"] = percentiles(sim)
                print(
                    f"similar_users(k=10) over {args.users:,} users (exact): "
                    f"p50 {figures['similar_p50_ms']:.0f} ms, max {max(sim) * 1000:.0f} ms"
                )
            sizes = conn.execute(
                """
                SELECT c.relname, pg_relation_size(c.oid), pg_indexes_size(c.oid),
                       pg_total_relation_size(c.oid)
                FROM pg_class c
                WHERE c.relname IN ('user_current_versions', 'user_interest_vectors', 'item_vectors',
                                    'applied_events')
                ORDER BY c.relname
                """
            ).fetchall()
            hnsw = conn.execute("SELECT pg_relation_size(to_regclass('item_vectors_hnsw'))").fetchone()
        print("sizes (MB): table, indexes, total incl. TOAST")
        for name, table, indexes, total_b in sizes:
            print(f"  {name:24s} {table / 2**20:9.1f} {indexes / 2**20:9.1f} {total_b / 2**20:9.1f}")
        if hnsw and hnsw[0]:
            print(f"  item_vectors_hnsw index  {hnsw[0] / 2**20:9.1f}")

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        bars = [("lookup", lookup), ("top-10", topk)]
        if "top10_exact_p50_ms" in figures:
            bars.append(("top-10 exact", exact_t))
        for n, (_name, samples) in enumerate(bars):
            p50, p99 = percentiles(samples)
            left.bar([n - 0.2], [p50], width=0.4, color="tab:blue", label="p50" if n == 0 else None)
            left.bar([n + 0.2], [p99], width=0.4, color="tab:orange", label="p99" if n == 0 else None)
        left.set_xticks(range(len(bars)), [b[0] for b in bars])
        left.set_yscale("log")
        left.set_ylabel("ms")
        left.legend()
        left.set_title(f"latency ({store.backend.value})")
        right.bar(["written", "target"], [figures["versions_per_s"], 20_000], color=["tab:green", "tab:gray"])
        right.set_title(f"versions/s, {args.users:,} users x {args.rounds}, {args.dim}-d")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
