"""Item vectors with and without the HNSW index: the cost of a publish and of a top-10 read.

    python bench/bench_item_index.py                          # 1,682 and 10,000 items, 65-d and 384-d
    python bench/bench_item_index.py --items 100000 --dims 65 --versions 2

Every published model version writes a vector per catalog item. For each catalog size and
width it writes `--versions` versions into `item_vectors` (embedded PostgreSQL + pgvector),
once with the HNSW index of migration 0002 live and once with only the btree on the model
version (migration 0005, the default since), then times `--reads` top-10 queries of one
version, as `user_top_items` runs them. Prints both, and the ratios, from the same run.
Vectors cluster around 200 random centres, as real embeddings do.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.db import EmbeddedPostgres, make_engine, upgrade
from storage.repository import VectorStore

HNSW = (
    "CREATE INDEX item_vectors_hnsw ON item_vectors USING hnsw (vector vector_ip_ops) "
    "WITH (m = 16, ef_construction = 64)"
)


def measure(
    url: str, n_items: int, dim: int, versions: int, reads: int, hnsw: bool
) -> tuple[float, float, float]:
    """(median seconds per version written, top-10 p50 ms, p99 ms)."""
    rng = np.random.default_rng(0)
    upgrade(url, vector_dim=dim)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE item_vectors CASCADE"))
            conn.execute(text("DROP INDEX IF EXISTS item_vectors_hnsw"))
            if hnsw:
                conn.execute(text(HNSW))
        store = VectorStore(engine, group_id="bench")
        centres = rng.standard_normal((200, dim)).astype(np.float32)
        noise = 0.3 * rng.standard_normal((n_items, dim)).astype(np.float32)
        items = centres[rng.integers(0, 200, n_items)] + noise
        ids = [f"item-{i}" for i in range(n_items)]
        writes = []
        for v in range(versions):
            started = time.perf_counter()
            store.write_item_vectors(f"m@{v}", ids, items + 0.01 * v)
            writes.append(time.perf_counter() - started)
        with engine.connect() as conn:
            conn.execute(text("ANALYZE item_vectors"))
            # user_top_items' own settings (storage/functions.py).
            conn.execute(text("SET hnsw.iterative_scan = 'relaxed_order'"))
            conn.execute(text("SET hnsw.ef_search = 100"))
            took = []
            for _ in range(reads):
                q = "[" + ",".join(f"{x:.5f}" for x in rng.standard_normal(dim)) + "]"
                started = time.perf_counter()
                conn.execute(
                    text(
                        "SELECT item_id FROM item_vectors WHERE model_version = :v "
                        "ORDER BY vector <#> CAST(:q AS vector) LIMIT 10"
                    ),
                    {"v": f"m@{versions // 2}", "q": q},
                ).all()
                took.append((time.perf_counter() - started) * 1000)
        ms = np.array(took[max(1, reads // 10) :])
        return float(np.median(writes)), float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    finally:
        engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", default="1682,10000", help="catalog sizes, comma-separated")
    ap.add_argument("--dims", default="65,384", help="vector widths (65: adapter, 384: decayed_mean)")
    ap.add_argument("--versions", type=int, default=4, help="model versions written per case")
    ap.add_argument("--reads", type=int, default=100, help="top-10 queries per case")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="istream-bench-") as tmp:
        Path(tmp).chmod(0o755)
        pg = EmbeddedPostgres(Path(tmp) / "pg")
        url = pg.start()
        try:
            cases = [(int(n), int(d)) for n in a.items.split(",") for d in a.dims.split(",")]
            for k, (n, d) in enumerate(cases, 1):
                for hnsw in (True, False):
                    # A fresh database per width: the column type is fixed at migration.
                    with make_engine(url).begin() as conn:
                        conn.execute(text("DROP SCHEMA public CASCADE"))
                        conn.execute(text("CREATE SCHEMA public"))
                    w, p50, p99 = measure(url, n, d, a.versions, a.reads, hnsw)
                    rows.append((n, d, "hnsw" if hnsw else "btree", w, p50, p99))
                    print(
                        f"[{k}/{len(cases)}] {n:,} items, {d}-d, {'HNSW' if hnsw else 'btree only'}: "
                        f"{w:.3f} s per version written, top-10 p50 {p50:.1f} ms, p99 {p99:.1f} ms",
                        flush=True,
                    )
        finally:
            pg.stop()
    print("\n| items | dim | index | s per version written | top-10 p50 ms | top-10 p99 ms |")
    print("|---|---|---|---|---|---|")
    for n, d, idx, w, p50, p99 in rows:
        print(f"| {n:,} | {d} | {idx} | {w:.3f} | {p50:.1f} | {p99:.1f} |")
    print()
    for i in range(0, len(rows), 2):
        h, b = rows[i], rows[i + 1]
        print(
            f"{h[0]:,} items, {h[1]}-d: writes {h[3] / b[3]:.1f}x faster without HNSW; "
            f"top-10 p50 {b[4] / h[4]:.2f}x of HNSW's"
        )


if __name__ == "__main__":
    main()
