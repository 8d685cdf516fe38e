"""Typed vectors + item index, SQL functions, retention, erasure tombstones and audit.

- `storage_meta` records the vector backend (pgvector or the `real[]` fallback, as
  0001 created it) and the width fixed now from ISTREAM_VECTOR_DIM (default 384),
  plus a random salt for erasure tombstones.
- Vector columns of users and items become `vector(d)` (pgvector: needed for an
  HNSW index) or keep `real[]` with a CHECK on the width (fallback). Rows already
  there must have that width; otherwise the upgrade stops and says which width to set.
- `user_interests_current` becomes a view: a small `user_current_versions` table
  (user, version, counters) points at the newest history row. Each batch then writes
  every vector once (appended to the history) instead of twice, and rewrites only a
  ~100-byte row per user: about twice the write rate, and half the size on disk.
- HNSW index (inner product) on item vectors, pgvector only.
- Functions: user_top_items, user_vector_as_of, similar_users, prune_user_vectors,
  prune_item_vectors, erase_user.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects.postgresql import BYTEA, JSONB

from storage.functions import user_top_items_sql
from storage.vectors import Backend, configured_dim, recorded_backend

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
VECTOR_TABLES = ("item_vectors", "user_interest_vectors", "user_interests_current")  # as of 0001
TYPED_TABLES = ("item_vectors", "user_interest_vectors")  # where vectors live from 0002 on
CURRENT_VIEW = """
CREATE VIEW user_interests_current AS
SELECT p.user_id, p.version, h.model_version, h.vector, p.n_events, p.last_event_ts, p.updated_at,
       h.cold_start
FROM user_current_versions p
JOIN user_interest_vectors h ON h.user_id = p.user_id AND h.version = p.version
"""
# Batch transactions hold this advisory lock shared, erase_user holds it exclusive: an
# erasure waits for in-flight batches and the next batch sees its tombstone.
ERASURE_LOCK = 7_315_001
# The same in 0001 and here (re-created because the table's vector type changes under it).
USER_VECTOR_AS_OF = """
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


def _existing_widths(conn: sa.Connection, table: str, backend: Backend) -> list[int]:
    width = "vector_dims(vector)" if backend is Backend.PGVECTOR else "array_length(vector, 1)"
    rows = conn.execute(sa.text(f"SELECT DISTINCT {width} FROM {table}")).scalars()
    return sorted(w for w in rows if w is not None)


# Every table that holds rows of a user, in the order erase_user deletes them.
USER_TABLES = ("applied_events", "user_states", "user_current_versions", "user_interest_vectors")


def _erase_rows() -> str:
    """erase_user's deletes, each counted into v_counts under its table's name."""
    return "\n".join(
        f"""            DELETE FROM {t} WHERE user_id = p_user_id;
            GET DIAGNOSTICS v_n = ROW_COUNT;
            v_counts := v_counts || jsonb_build_object('{t}', v_n);"""
        for t in USER_TABLES
    )


def _functions(backend: Backend, dim: int) -> list[str]:
    pgv = backend is Backend.PGVECTOR
    if pgv:
        user_sim = "1 - (o.vector <=> u.vector)"
        user_order = "o.vector <=> u.vector"
        helpers: list[str] = []
    else:
        user_sim = "istream_cosine(o.vector, u.vector)"
        user_order = "istream_cosine(o.vector, u.vector) DESC"
        helpers = [
            """
            CREATE FUNCTION istream_dot(a real[], b real[]) RETURNS double precision
            LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
                SELECT sum(x::float8 * y::float8) FROM unnest(a, b) AS t(x, y)
            $$
            """,
            """
            CREATE FUNCTION istream_cosine(a real[], b real[]) RETURNS double precision
            LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
                SELECT sum(x::float8 * y::float8)
                       / nullif(sqrt(sum(x::float8 * x::float8)) * sqrt(sum(y::float8 * y::float8)), 0)
                FROM unnest(a, b) AS t(x, y)
            $$
            """,
        ]
    return [
        *helpers,
        user_top_items_sql(backend, dim, prior=False),
        USER_VECTOR_AS_OF,
        f"""
        CREATE FUNCTION similar_users(p_user_id text, p_k int DEFAULT 10)
        RETURNS TABLE (user_id varchar, similarity double precision)
        LANGUAGE sql STABLE AS $$
            SELECT o.user_id, {user_sim}
            FROM user_interests_current u
            JOIN user_interests_current o
              ON o.model_version = u.model_version AND o.user_id <> u.user_id
            WHERE u.user_id = p_user_id
            ORDER BY {user_order}, o.user_id
            LIMIT p_k
        $$
        """,
        # Retention. Kept: each user's newest p_keep_versions, everything younger than
        # p_keep_all, and beyond that the last version of every UTC hour (up to
        # p_hourly old) or day (older). The last version of a bucket is the one current
        # at the bucket's end, so as-of answers stay exact at those boundaries.
        """
        CREATE FUNCTION prune_user_vectors(p_keep_versions int, p_keep_all interval, p_hourly interval,
                                           p_after text DEFAULT NULL, p_upto text DEFAULT NULL,
                                           p_now timestamptz DEFAULT now())
        RETURNS bigint
        LANGUAGE sql VOLATILE AS $$
            WITH ranked AS (
                SELECT v.user_id, v.version,
                       row_number() OVER (PARTITION BY v.user_id ORDER BY v.version DESC) AS newest_rank,
                       CASE WHEN v.created_at > p_now - p_keep_all THEN NULL
                            WHEN v.created_at > p_now - p_hourly THEN 'h' ELSE 'd' END AS grain,
                       -- (start, end] buckets: a version made exactly on the hour belongs to
                       -- the hour it ends, the one whose end it is current at.
                       date_trunc(CASE WHEN v.created_at > p_now - p_hourly THEN 'hour' ELSE 'day' END,
                                  v.created_at - interval '1 microsecond', 'UTC') AS bucket
                FROM user_interest_vectors v
                -- One slice of users, (p_after, p_upto], so big tables prune in short transactions.
                WHERE (p_after IS NULL OR v.user_id > p_after) AND (p_upto IS NULL OR v.user_id <= p_upto)
            ), doomed AS (
                SELECT x.user_id, x.version FROM (
                    SELECT r.user_id, r.version,
                           row_number() OVER (PARTITION BY r.user_id, r.grain, r.bucket
                                              ORDER BY r.version DESC) AS in_bucket
                    FROM ranked r
                    WHERE r.newest_rank > p_keep_versions AND r.grain IS NOT NULL
                ) x
                WHERE x.in_bucket > 1
            ), gone AS (
                DELETE FROM user_interest_vectors v USING doomed d
                WHERE v.user_id = d.user_id AND v.version = d.version
                RETURNING 1
            )
            SELECT count(*) FROM gone
        $$
        """,
        # Item vectors of a model version no user row names any more, unless it is the
        # newest version or younger than p_keep_all (a worker publishes items first).
        """
        CREATE FUNCTION prune_item_vectors(p_keep_all interval, p_now timestamptz DEFAULT now())
        RETURNS bigint
        LANGUAGE sql VOLATILE AS $$
            WITH unused AS (
                SELECT m.model_version FROM model_versions m
                WHERE m.created_at < p_now - p_keep_all
                  AND m.model_version <> (SELECT model_version FROM model_versions
                                          ORDER BY created_at DESC, model_version DESC LIMIT 1)
                  AND NOT EXISTS (SELECT 1 FROM user_interests_current c
                                  WHERE c.model_version = m.model_version)
                  AND NOT EXISTS (SELECT 1 FROM user_interest_vectors h
                                  WHERE h.model_version = m.model_version)
            ), gone AS (
                DELETE FROM item_vectors iv USING unused u
                WHERE iv.model_version = u.model_version
                RETURNING 1
            )
            SELECT count(*) FROM gone
        $$
        """,
        f"""
        CREATE FUNCTION erase_user(p_user_id text, p_drop_until timestamptz DEFAULT now())
        RETURNS jsonb
        LANGUAGE plpgsql VOLATILE AS $$
        DECLARE
            v_hash bytea;
            v_counts jsonb := '{{}}'::jsonb;
            v_n bigint;
        BEGIN
            PERFORM pg_advisory_xact_lock({ERASURE_LOCK});
            SELECT sha256(convert_to(m.value || p_user_id, 'UTF8')) INTO STRICT v_hash
            FROM storage_meta m WHERE m.key = 'erasure_salt';
{_erase_rows()}
            INSERT INTO erased_users AS t (user_hash, erased_at, drop_until)
            VALUES (v_hash, now(), greatest(p_drop_until, now()))
            ON CONFLICT (user_hash) DO UPDATE
                SET erased_at = excluded.erased_at,
                    drop_until = greatest(t.drop_until, excluded.drop_until);
            INSERT INTO erasure_audit (rows_deleted) VALUES (v_counts);
            RETURN v_counts;
        END
        $$
        """,
        "REVOKE EXECUTE ON FUNCTION erase_user(text, timestamptz) FROM PUBLIC",
        "REVOKE EXECUTE ON FUNCTION prune_user_vectors(int, interval, interval, text, text, timestamptz) "
        "FROM PUBLIC",
        "REVOKE EXECUTE ON FUNCTION prune_item_vectors(interval, timestamptz) FROM PUBLIC",
    ]


DROP_FUNCTIONS = (
    "DROP FUNCTION IF EXISTS user_top_items(text, int, boolean)",
    "DROP FUNCTION IF EXISTS user_vector_as_of(text, timestamptz, boolean)",
    "DROP FUNCTION IF EXISTS similar_users(text, int)",
    "DROP FUNCTION IF EXISTS prune_user_vectors(int, interval, interval, text, text, timestamptz)",
    "DROP FUNCTION IF EXISTS prune_item_vectors(interval, timestamptz)",
    "DROP FUNCTION IF EXISTS erase_user(text, timestamptz)",
    "DROP FUNCTION IF EXISTS istream_dot(real[], real[])",
    "DROP FUNCTION IF EXISTS istream_cosine(real[], real[])",
)


def upgrade() -> None:
    conn = op.get_bind()
    backend = recorded_backend(conn)
    dim = configured_dim(context.config.attributes.get("vector_dim"))
    for table in VECTOR_TABLES:
        other = [w for w in _existing_widths(conn, table, backend) if w != dim]
        if other:
            raise RuntimeError(
                f"{table} holds {other[0]}-dimensional vectors but the schema is being fixed at {dim}: "
                f"set ISTREAM_VECTOR_DIM={other[0]} and run `istream db upgrade` again"
            )

    op.create_table(
        "storage_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    meta = sa.table("storage_meta", sa.column("key"), sa.column("value"))
    op.bulk_insert(
        meta,
        [
            {"key": "vector_backend", "value": backend.value},
            {"key": "vector_dim", "value": str(dim)},
            {"key": "erasure_salt", "value": secrets.token_hex(32)},
        ],
    )

    for stmt in DROP_FUNCTIONS:
        op.execute(stmt)
    # 0001 wrote each version to both tables; make sure, then keep only the pointer.
    op.execute(
        """
        INSERT INTO user_interest_vectors
            (user_id, version, model_version, vector, n_events, last_event_ts, created_at, cold_start)
        SELECT user_id, version, model_version, vector, n_events, last_event_ts, updated_at, cold_start
        FROM user_interests_current
        ON CONFLICT (user_id, version) DO NOTHING
        """
    )
    op.create_table(
        "user_current_versions",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("n_events", sa.BigInteger, nullable=False),
        sa.Column("last_event_ts", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        # Room on each page for the new row version: the per-batch update stays HOT.
        postgresql_with={"fillfactor": 70},
    )
    op.execute(
        "INSERT INTO user_current_versions SELECT user_id, version, n_events, last_event_ts, updated_at "
        "FROM user_interests_current"
    )
    op.drop_table("user_interests_current")
    for table in TYPED_TABLES:
        if backend is Backend.PGVECTOR:
            op.execute(f"ALTER TABLE {table} ALTER COLUMN vector TYPE vector({dim})")
        else:
            op.execute(
                f"ALTER TABLE {table} ADD CONSTRAINT {table}_vector_width "
                f"CHECK (array_ndims(vector) = 1 AND array_length(vector, 1) = {dim})"
            )
    op.execute(CURRENT_VIEW)
    # Skip-seen looks up (user, item) pairs.
    op.drop_index("applied_events_by_user", table_name="applied_events")
    op.create_index("applied_events_by_user_item", "applied_events", ["user_id", "item_id"])
    if backend is Backend.PGVECTOR:
        op.execute(
            "CREATE INDEX item_vectors_hnsw ON item_vectors USING hnsw (vector vector_ip_ops) "
            "WITH (m = 16, ef_construction = 64)"
        )

    op.create_table(
        "erased_users",
        sa.Column("user_hash", BYTEA, primary_key=True),
        sa.Column("erased_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("drop_until", TS, nullable=False),
    )
    op.create_table(
        "erasure_audit",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("erased_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("actor", sa.Text, nullable=False, server_default=sa.text("current_user")),
        sa.Column("rows_deleted", JSONB, nullable=False),
    )
    for stmt in _functions(backend, dim):
        op.execute(stmt)


def downgrade() -> None:
    conn = op.get_bind()
    backend = recorded_backend(conn)
    for stmt in DROP_FUNCTIONS:
        op.execute(stmt)
    op.drop_table("erasure_audit")
    op.drop_table("erased_users")
    if backend is Backend.PGVECTOR:
        op.execute("DROP INDEX IF EXISTS item_vectors_hnsw")
    op.drop_index("applied_events_by_user_item", table_name="applied_events")
    op.create_index("applied_events_by_user", "applied_events", ["user_id"])
    op.execute("CREATE TABLE user_interests_current_0001 AS SELECT * FROM user_interests_current")
    op.execute("DROP VIEW user_interests_current")
    op.drop_table("user_current_versions")
    op.execute("ALTER TABLE user_interests_current_0001 RENAME TO user_interests_current")
    op.execute("ALTER TABLE user_interests_current ADD PRIMARY KEY (user_id)")
    for column in ("version", "model_version", "vector", "n_events", "last_event_ts", "updated_at"):
        op.execute(f"ALTER TABLE user_interests_current ALTER COLUMN {column} SET NOT NULL")
    op.execute("ALTER TABLE user_interests_current ALTER COLUMN updated_at SET DEFAULT clock_timestamp()")
    for table in VECTOR_TABLES:
        if backend is Backend.PGVECTOR:
            op.execute(f"ALTER TABLE {table} ALTER COLUMN vector TYPE vector")
        elif table in TYPED_TABLES:
            op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_vector_width")
    op.drop_table("storage_meta")
    if backend is Backend.PGVECTOR:
        # 0001's functions, as 0001 made them.
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
        op.execute(USER_VECTOR_AS_OF)  # unchanged since 0001
