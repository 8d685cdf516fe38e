"""Storage tests run twice: on the embedded PostgreSQL 18 + pgvector and on a stock PostgreSQL 15
without pgvector (the `real[]` fallback). A server that cannot start fails; a missing PG15 install
only skips outside CI (CI=true turns that into a failure too)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from models.core import UserUpdate
from models.events import Event
from storage.db import EmbeddedPostgres, libpq_url, make_engine, upgrade
from storage.repository import VectorStore
from tests.plain_postgres import PlainPostgres, plain_pg_bin

DIM = 8  # small vectors keep the tests fast; the width is a migration-time setting


@pytest.fixture(scope="session")
def plain_postgres(servers_root: Path) -> Iterator[PlainPostgres]:
    if not (plain_pg_bin() / "pg_ctl").is_file():
        message = f"PostgreSQL 15 is not installed at {plain_pg_bin()} (apt-get install -y postgresql-15)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    server = PlainPostgres(servers_root / "pg15")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session", params=["pgvector", "plain-pg15"])
def server_url(request: pytest.FixtureRequest) -> str:
    """Admin URL of the server under test (the `postgres` database)."""
    if request.param == "pgvector":
        pg: EmbeddedPostgres = request.getfixturevalue("postgres")
        return libpq_url(str(make_url(pg.url).set(database="postgres")))
    plain: PlainPostgres = request.getfixturevalue("plain_postgres")
    return plain.url_for("postgres")


@pytest.fixture
def server_kind(server_url: str, request: pytest.FixtureRequest) -> str:
    """'pgvector' or 'plain-pg15': which server this run of a test is on."""
    return request.node.callspec.params["server_url"]


@pytest.fixture
def new_database(server_url: str) -> Iterator[Callable[[], str]]:
    """Factory of fresh, empty databases on the server under test; all dropped afterwards."""
    admin = make_engine(server_url, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make() -> str:
        name = "s_" + uuid.uuid4().hex[:12]
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return libpq_url(make_url(server_url).set(database=name).render_as_string(hide_password=False))

    yield make
    with admin.connect() as conn:
        for name in made:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def store_url(new_database: Callable[[], str]) -> str:
    url = new_database()
    upgrade(url, vector_dim=DIM)
    return url


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    eng = make_engine(store_url, pool_size=4)
    yield eng
    eng.dispose()


@pytest.fixture
def store(engine: Engine) -> VectorStore:
    return VectorStore(engine, group_id="test")


def unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def update(user_id: str, vector: np.ndarray, n: int = 1, ts: float = 1.7e9) -> UserUpdate:
    return UserUpdate(user_id=user_id, vector=vector, n_applied=n, last_event_ts=ts)


def rating(event_id: str, user_id: str, item_id: str, ts: float = 1.7e9) -> Event:
    return Event(event_id=event_id, user_id=user_id, kind="rating", ts=ts, item_id=item_id, rating=4.0)


def utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, tz=UTC)
