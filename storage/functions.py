"""SQL text of `user_top_items`, shared by the migrations that (re)create it.

Migrations 0002 and 0004 both build it, for the backend and width fixed at 0002;
keeping one builder means the two can only differ where they mean to (0004's prior).
"""

from __future__ import annotations

from storage.vectors import Backend, sql_type

# 0004: a user with no vector yet is served the newest version's prior, the vector its model
# gives a user it knows nothing of (for the learned default: time-decayed popularity). Before,
# such a user got no rows, while the backtest ranked them by that prior.
_PRIOR_FALLBACK = """
            IF NOT FOUND THEN
                SELECT CAST(m.prior_vector AS {vec_type}), m.model_version INTO v_vec, v_model
                FROM model_versions m WHERE m.prior_vector IS NOT NULL
                ORDER BY m.created_at DESC, m.model_version DESC LIMIT 1;
            END IF;"""


def user_top_items_sql(backend: Backend, dim: int, *, prior: bool) -> str:
    """CREATE FUNCTION user_top_items: the user's k best items of the version their vector names.

    With `prior` (0004 on), a user without a vector gets the newest version's prior instead of
    no rows.
    """
    vec_type = sql_type(backend, dim)
    if backend is Backend.PGVECTOR:
        score = "-(iv.vector <#> v_vec)"
        order = "iv.vector <#> v_vec"
        # Filters (model version, skip seen) would starve a plain HNSW scan; iterative
        # scans keep reading the index until k rows pass them (pgvector >= 0.8). A wider
        # search list than pgvector's default 40 buys recall for little time; tune it with
        # ALTER FUNCTION user_top_items(text, int, boolean) SET hnsw.ef_search = ...
        settings = "SET hnsw.iterative_scan = 'relaxed_order' SET hnsw.ef_search = 100"
    else:
        # Inline rather than istream_dot(): a SQL function call per item costs ~2x here.
        score = "(SELECT sum(x::float8 * y::float8) FROM unnest(iv.vector, v_vec) AS t(x, y))"
        order = "2 DESC"
        settings = ""
    fallback = _PRIOR_FALLBACK.format(vec_type=vec_type) if prior else ""
    return f"""
        CREATE FUNCTION user_top_items(p_user_id text, p_k int DEFAULT 10,
                                       p_skip_seen boolean DEFAULT false)
        RETURNS TABLE (item_id varchar, score double precision)
        LANGUAGE plpgsql STABLE {settings} AS $$
        #variable_conflict use_column
        DECLARE
            v_vec {vec_type};
            v_model varchar;
        BEGIN
            -- Fetch the user first so the item scan is ordered by a constant: that is
            -- what lets the planner walk the HNSW index instead of scoring every item.
            SELECT u.vector, u.model_version INTO v_vec, v_model
            FROM user_interests_current u WHERE u.user_id = p_user_id;{fallback}
            IF NOT FOUND THEN
                RETURN;
            END IF;
            RETURN QUERY
            WITH hits AS MATERIALIZED (
                SELECT iv.item_id, {score} AS score
                FROM item_vectors iv
                WHERE iv.model_version = v_model
                  AND NOT (p_skip_seen AND EXISTS (
                      SELECT 1 FROM applied_events e
                      WHERE e.user_id = p_user_id AND e.item_id = iv.item_id))
                ORDER BY {order}
                LIMIT p_k
            )
            SELECT h.item_id, h.score FROM hits h ORDER BY h.score DESC, h.item_id;
        END
        $$
        """
