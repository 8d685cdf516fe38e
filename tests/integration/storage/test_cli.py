"""`istream db upgrade/prune/grant-reader` and `istream erase`, run as a user runs them."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable

import numpy as np
import pytest
from sqlalchemy import text

from storage.db import make_engine
from storage.repository import VectorStore
from tests.helpers import run_cli
from tests.integration.storage.conftest import DIM, rating, update

pytestmark = pytest.mark.integration
# The commands are the same code on both backends (the other tests cover those): one server is enough.
on_pgvector = pytest.mark.parametrize("server_url", ["pgvector"], indirect=True)


def istream(url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"ISTREAM_DATABASE_URL": url, "ISTREAM_VECTOR_DIM": str(DIM)}, stdin=stdin)


@pytest.mark.slow
@on_pgvector
def test_maintenance_commands(new_database: Callable[[], str]) -> None:
    url = new_database()
    early = istream(url, "erase", "u1", "--yes")
    assert (
        early.returncode == 1
        and early.stderr.strip() == "istream: schema is at nothing: run `istream db upgrade` first"
    )
    migrated = istream(url, "db", "upgrade")
    assert migrated.stdout.strip() == f"schema at revision 0006 (pgvector vectors, {DIM} dimensions)"
    engine = make_engine(url)
    store = VectorStore(engine)
    assert store.dim == DIM  # ISTREAM_VECTOR_DIM reached the migration
    now = time.time()
    store.commit_batch("m1", {"u1": update("u1", np.ones(DIM, np.float32))}, [rating("e1", "u1", "i1", now)])

    pruned = istream(url, "db", "prune", "--keep-versions", "3")
    assert pruned.returncode == 0 and "pruned 0 old versions of 1 users" in pruned.stdout
    bad = istream(url, "db", "prune", "--keep-versions", "0")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1

    declined = istream(url, "erase", "u1", stdin="n\n")
    assert declined.returncode != 0 and store.current("u1") is not None
    erased = istream(url, "erase", "u1", "--yes", "--grace", "60")
    assert erased.returncode == 0, erased.stderr
    assert "user_interest_vectors 1" in erased.stdout and store.current("u1") is None

    role = "cli_reader_" + uuid.uuid4().hex[:6]
    granted = istream(url, "db", "grant-reader", role)
    assert granted.returncode == 0, granted.stderr
    assert f"connect with: postgresql://{role}@" in granted.stdout
    with engine.connect() as conn:
        me = conn.execute(text("SELECT current_user")).scalar_one()
    refused = istream(url, "db", "grant-reader", me)
    assert refused.returncode == 1 and "superuser" in refused.stderr and "Traceback" not in refused.stderr
    with engine.begin() as conn:
        conn.execute(text(f'DROP OWNED BY "{role}"'))
        conn.execute(text(f'DROP ROLE "{role}"'))
    engine.dispose()


def test_unreachable_database_is_one_line() -> None:
    out = istream("postgresql://nobody@/x?host=/nonexistent&port=1", "db", "prune")
    assert out.returncode == 1
    assert (
        out.stderr.startswith("istream: cannot reach Postgres:") and len(out.stderr.strip().splitlines()) == 1
    )
