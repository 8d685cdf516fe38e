"""Fixtures for the real embedded servers. They never skip: a server that cannot start fails the test."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from storage.db import EmbeddedPostgres, libpq_url, make_engine, upgrade
from stream.broker import EmbeddedBroker

ML100K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="session")
def servers_root() -> Iterator[Path]:
    """Where server data lives. Not under pytest's tmp tree: pytest closes that to its owner
    (0700) whenever a session starts, and the servers run as other system users."""
    root = Path(tempfile.mkdtemp(prefix="istream-servers-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def server_tmp(servers_root: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh folder for one test's servers."""
    path = Path(tempfile.mkdtemp(prefix=request.node.name[:40] + "-", dir=servers_root))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def postgres(servers_root: Path) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(servers_root / "pg" / "data")
    pg.start()
    yield pg
    pg.stop()


@pytest.fixture
def empty_db_url(postgres: EmbeddedPostgres) -> Iterator[str]:
    """A fresh, empty database on the session's embedded server."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = make_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = postgres.url
    url = base.replace(f"/{postgres.database}?", f"/{name}?")
    yield libpq_url(url)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """A fresh database migrated to the newest schema."""
    upgrade(empty_db_url)
    return empty_db_url


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A fresh embedded broker per test (topics live in its memory only)."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def ml100k() -> Path:
    if not (ML100K / "u.data").is_file():
        pytest.fail(f"MovieLens 100K is expected at {ML100K.resolve()}")
    return ML100K.resolve()
