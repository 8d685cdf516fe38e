"""Read-only access for SQL users: a role that can query vectors and call the functions, never write."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql
from sqlalchemy import Engine, text

# Everything a reader needs. Left out on purpose: storage_meta (its erasure salt would let
# a reader test guesses against the tombstone hashes) and erased_users.
READER_TABLES = (
    "model_versions",
    "items",
    "item_vectors",
    "user_interest_vectors",
    "user_interests_current",
    "user_current_versions",
    "applied_events",
    "consumed_offsets",
    "user_states",
    "base_encodings",
    "erasure_audit",
)
READER_FUNCTIONS = (
    "user_top_items(text, int, boolean)",
    "user_vector_as_of(text, timestamptz, boolean)",
    "similar_users(text, int)",
)
FALLBACK_HELPERS = ("istream_dot(real[], real[])", "istream_cosine(real[], real[])")


class AccessError(ValueError):
    """A role that cannot be made a reader (a superuser, say)."""


@dataclass(frozen=True, slots=True)
class ReaderGrant:
    role: str
    created: bool
    database: str


def grant_reader(
    engine: Engine, role: str, *, login: bool = True, password: str | None = None
) -> ReaderGrant:
    """Create `role` if missing (LOGIN unless told otherwise) and grant it read access only.

    Runs as the schema owner. The role also gets default_transaction_read_only, so even a
    table granted to it by mistake later stays read-only unless the session overrides it.
    """
    if not role or len(role) > 63:
        raise AccessError("a role name is 1 to 63 characters")
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        found = conn.execute(
            text("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = :r"), {"r": role}
        ).first()
        if found is not None and found[0]:
            raise AccessError(f"role {role} is a superuser (or bypasses row security): it cannot be a reader")
        owner = conn.execute(
            text(
                "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE r.rolname = :r"
            ),
            {"r": role},
        ).scalar_one()
        if owner:
            raise AccessError(f"role {role} owns tables: a reader must not own what it reads")
        ident = sql.Identifier(role)
        if found is None:
            create = sql.SQL("CREATE ROLE {} {}").format(ident, sql.SQL("LOGIN" if login else "NOLOGIN"))
            if password:
                create = sql.SQL("{} PASSWORD {}").format(create, sql.Literal(password))
            raw.execute(create)
        elif password:
            raw.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(password)))
        database = conn.execute(text("SELECT current_database()")).scalar_one()
        schema = conn.execute(text("SELECT current_schema()")).scalar_one()
        raw.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), ident))
        raw.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), ident))
        raw.execute(
            sql.SQL("GRANT SELECT ON {} TO {}").format(
                sql.SQL(", ").join(sql.Identifier(t) for t in READER_TABLES), ident
            )
        )
        helpers = [
            f
            for f in FALLBACK_HELPERS
            if conn.execute(text("SELECT to_regprocedure(:f)"), {"f": f}).scalar() is not None
        ]
        for fn in (*READER_FUNCTIONS, *helpers):
            # Signatures are our own constants, not user input.
            raw.execute(sql.SQL("GRANT EXECUTE ON FUNCTION " + fn + " TO {}").format(ident))  # type: ignore[arg-type]
        raw.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(ident))
    return ReaderGrant(role=role, created=found is None, database=database)
