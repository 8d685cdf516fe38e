"""Point-in-time mode: a backtest's vectors, with their event times, in a Postgres schema of its own.

Each backtested model gets its own schema (`<prefix>_<model>`), migrated with
the project's own migrations, so it holds exactly the production tables and SQL
functions. Every micro-batch is written through `storage.repository.VectorStore`
as the worker writes it (one transaction per batch; `last_event_ts` is event
time), so the as-of function answers "what was this user's vector at event time
T in this backtest":

    SELECT * FROM <schema>.user_vector_as_of('42', '1998-01-01T00:00:00Z', true);

The schema's functions are pinned to their schema (`SET search_path`), so they
read the backtest's tables whatever the caller's search_path is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import quote

from sqlalchemy import Engine, text

from models.core import BatchResult, InterestModel
from models.events import Event
from storage.db import make_engine, upgrade
from storage.repository import VectorStore

_MAX_IDENT = 63  # Postgres truncates identifiers beyond this


def schema_name(prefix: str, model: str) -> str:
    """A safe, lower-case identifier: `<prefix>_<model>` with anything odd turned into `_`."""
    raw = f"{prefix}_{model}".lower()
    name = re.sub(r"[^a-z0-9_]", "_", raw)
    if not re.match(r"[a-z_]", name):
        name = "_" + name
    if len(name) > _MAX_IDENT:
        raise ValueError(f"schema name {name!r} is longer than {_MAX_IDENT} characters; use a shorter prefix")
    return name


def with_search_path(url: str, schema: str) -> str:
    """The same database URL, with every session's search_path set to `schema`, then public."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema},public')}"


def prepare_schema(url: str, schema: str, replace: bool = False, vector_dim: int | None = None) -> str:
    """Create (or, with `replace`, recreate) the schema, migrate it, pin its functions; returns its URL."""
    admin = make_engine(url)
    try:
        with admin.begin() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_namespace WHERE nspname = :s"), {"s": schema}
            ).scalar()
            if exists and not replace:
                raise ValueError(f"schema {schema!r} already exists; choose another prefix or replace it")
            if exists:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            # The extension lives in public, shared, never inside a backtest's schema.
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector SCHEMA public"))
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            # Alembic looks its version table up through search_path; without one of its own here it
            # would find public's, conclude the schema is migrated, and create nothing.
            conn.execute(
                text(
                    f'CREATE TABLE "{schema}".alembic_version (version_num varchar(32) NOT NULL, '
                    "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
                )
            )
    finally:
        admin.dispose()
    scoped = with_search_path(url, schema)
    upgrade(scoped, vector_dim=vector_dim)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            funcs = conn.execute(
                text(
                    "SELECT p.oid::regprocedure::text FROM pg_proc p "
                    "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = :s"
                ),
                {"s": schema},
            ).scalars()
            for sig in list(funcs):
                conn.execute(text(f'ALTER FUNCTION {sig} SET search_path = "{schema}", public'))
    finally:
        engine.dispose()
    return scoped


class PointInTimeWriter:
    """A backtest `on_learned` hook: writes every model's batch results into that model's schema."""

    def __init__(
        self,
        url: str,
        prefix: str,
        models: Mapping[str, InterestModel],
        base_model: str,
        replace: bool = False,
    ) -> None:
        self.models = models
        self.base_model = base_model
        self.schemas = {name: schema_name(prefix, name) for name in models}
        if len(set(self.schemas.values())) != len(self.schemas):
            raise ValueError("two models map to the same schema name; rename them")
        self._engines: list[Engine] = []
        self.stores: dict[str, VectorStore] = {}
        for name, schema in self.schemas.items():
            # Each schema is migrated for the width of the vectors its model writes.
            scoped = prepare_schema(url, schema, replace, vector_dim=models[name].dim)
            engine = make_engine(scoped, pool_size=2)
            self._engines.append(engine)
            self.stores[name] = VectorStore(engine, group_id=f"backtest:{schema}")
        self._published: dict[str, set[str]] = {name: set() for name in models}
        self.rows = {name: 0 for name in models}

    def __call__(self, name: str, events: Sequence[Event], result: BatchResult) -> None:
        store = self.stores[name]
        published = self._published[name]
        # As in the worker: item vectors of a version exist before any user row names it.
        if result.snapshot is not None and result.snapshot.version not in published:
            store.publish_model(result.snapshot, self.base_model)
            published.add(result.snapshot.version)
        if result.model_version not in published:
            store.publish_model(self.models[name].snapshot(), self.base_model)
            published.add(result.model_version)
        store.commit_batch(model_version=result.model_version, updates=result.updates, events=events)
        self.rows[name] += len(result.updates)

    def close(self) -> None:
        for engine in self._engines:
            engine.dispose()

    def __enter__(self) -> PointInTimeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
