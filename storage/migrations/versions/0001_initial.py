"""Initial schema: versioned user vectors, item vectors, registry, offsets, SQL functions.

Amended before its first release (and so before anyone ran it) for one thing only:
on a Postgres without pgvector the vector columns are `real[]` and the functions,
which need pgvector's operators, are left to 0002. With pgvector the DDL is as it was.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from storage.vectors import Backend, choose_backend

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    backend = choose_backend(op.get_bind(), context.config.attributes.get("vector_backend"))
    if backend is Backend.PGVECTOR:
        op.execute("CREATE EXTENSION IF NOT EXISTS vector")

    def vector_type() -> sa.types.TypeEngine:
        return Vector() if backend is Backend.PGVECTOR else ARRAY(sa.REAL)

    op.create_table(
        "model_versions",
        sa.Column("model_version", sa.String(200), primary_key=True),
        sa.Column("base_model", sa.Text, nullable=False),
        sa.Column("config", JSONB, nullable=False, server_default="{}"),
        sa.Column("parent", sa.String(200)),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("metrics", JSONB, nullable=False, server_default="{}"),
        sa.Column("weights_uri", sa.Text),
        sa.Column("weights", sa.LargeBinary),
    )
    op.create_table(
        "items",
        sa.Column("item_id", sa.String(128), primary_key=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("attrs", JSONB, nullable=False, server_default="{}"),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "item_vectors",
        sa.Column("item_id", sa.String(128), primary_key=True),
        sa.Column("model_version", sa.String(200), primary_key=True),
        sa.Column("vector", vector_type(), nullable=False),
    )
    op.create_index("item_vectors_by_model", "item_vectors", ["model_version"])
    for name, extra in (
        (
            "user_interest_vectors",
            [sa.Column("created_at", TS, nullable=False, server_default=sa.text("clock_timestamp()"))],
        ),
        (
            "user_interests_current",
            [sa.Column("updated_at", TS, nullable=False, server_default=sa.text("clock_timestamp()"))],
        ),
    ):
        key = [sa.Column("version", sa.Integer, nullable=False, primary_key=name != "user_interests_current")]
        op.create_table(
            name,
            sa.Column("user_id", sa.String(128), primary_key=True),
            *key,
            sa.Column("model_version", sa.String(200), nullable=False),
            sa.Column("vector", vector_type(), nullable=False),
            sa.Column("n_events", sa.BigInteger, nullable=False),
            sa.Column("last_event_ts", TS, nullable=False),
            *extra,
            sa.Column("cold_start", sa.String(32)),
        )
    op.create_table(
        "applied_events",
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("item_id", sa.String(128)),
        sa.Column("ts", TS, nullable=False),
        sa.Column("rating", sa.Float),
    )
    op.create_index("applied_events_by_user", "applied_events", ["user_id"])
    op.create_table(
        "consumed_offsets",
        sa.Column("group_id", sa.String(200), primary_key=True),
        sa.Column("topic", sa.String(250), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "user_states",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("model_version", sa.String(200), nullable=False),
        sa.Column("state", JSONB, nullable=False),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
    )
    # Base encodings survive restarts so the catalog is not re-encoded (keyed by base version).
    op.create_table(
        "base_encodings",
        sa.Column("base_version", sa.String(200), primary_key=True),
        sa.Column("text_sha1", sa.String(40), primary_key=True),
        sa.Column("vector", vector_type(), nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
    )
    if backend is not Backend.PGVECTOR:
        return
    # Functions SQL users call by hand (documented in the README).
    op.execute(
        """
        CREATE FUNCTION user_top_items(p_user_id text, p_k int DEFAULT 10,
                                       p_skip_seen boolean DEFAULT false)
        RETURNS TABLE (item_id varchar, score double precision)
        LANGUAGE sql STABLE AS $$
            SELECT iv.item_id, -(iv.vector <#> u.vector) AS score
            FROM user_interests_current u
            JOIN item_vectors iv ON iv.model_version = u.model_version
            WHERE u.user_id = p_user_id
              AND NOT (p_skip_seen AND EXISTS (
                  SELECT 1 FROM applied_events e
                  WHERE e.user_id = p_user_id AND e.item_id = iv.item_id))
            ORDER BY iv.vector <#> u.vector
            LIMIT p_k
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION user_vector_as_of(p_user_id text, p_at timestamptz,
                                          p_by_event_time boolean DEFAULT false)
        RETURNS SETOF user_interest_vectors
        LANGUAGE sql STABLE AS $$
            SELECT * FROM user_interest_vectors v
            WHERE v.user_id = p_user_id
              AND (CASE WHEN p_by_event_time THEN v.last_event_ts ELSE v.created_at END) <= p_at
            ORDER BY v.version DESC
            LIMIT 1
        $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS user_vector_as_of(text, timestamptz, boolean)")
    op.execute("DROP FUNCTION IF EXISTS user_top_items(text, int, boolean)")
    for table in (
        "base_encodings",
        "user_states",
        "consumed_offsets",
        "applied_events",
        "user_interests_current",
        "user_interest_vectors",
        "item_vectors",
        "items",
        "model_versions",
    ):
        op.drop_table(table)
