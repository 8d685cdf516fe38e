"""Item vectors without the HNSW index: a version's items are scored exactly.

Every published model version writes a vector for every catalog item, and the HNSW index
(0002) was maintained on each of those inserts: 1.5 s per version of ML-100K's 1,682 items
and 7.4 s for 10,000 items at 65-d, against 0.04 and 0.21 s without it
(`python bench/bench_item_index.py`). The worker's commit waited for those writes at every
publish. Reads do not need it: `user_top_items` scores the items of one model version, which
the btree `item_vectors_by_model` finds; exact top-10 took 1.1 ms over 1,682 items and 6.1 ms
over 10,000 (the HNSW scan 0.8 and 1.1 ms), far under the 50 ms target.

A catalog large enough for exact scoring to be slow (hundreds of thousands of items) can
add the index back by hand, and pays its cost at every publish (docs/storage.md);
`user_top_items` keeps its iterative-scan settings for that case.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

from storage.vectors import Backend, recorded_backend

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP INDEX IF EXISTS item_vectors_hnsw")


def downgrade() -> None:
    if recorded_backend(op.get_bind()) is Backend.PGVECTOR:
        op.execute(
            "CREATE INDEX item_vectors_hnsw ON item_vectors USING hnsw (vector vector_ip_ops) "
            "WITH (m = 16, ef_construction = 64)"
        )
