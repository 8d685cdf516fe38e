"""How vectors live in Postgres: pgvector `vector(d)` or the `real[]` fallback.

The choice is made once, at migration time, and recorded in `storage_meta`, so
every later reader and writer agrees with the columns that actually exist.
Python always exchanges vectors as `real[]` (pgvector casts `real[]` to
`vector` on assignment and `vector` to `real[]` implicitly), which is why one
code path serves both backends.
"""

from __future__ import annotations

import os
import struct
from enum import StrEnum

import numpy as np
from psycopg.adapt import Dumper
from psycopg.pq import Format
from sqlalchemy import Connection, text

DEFAULT_DIM = 384
# Environment variables read at migration time (they are also fields of stream.settings.Settings).
DIM_ENV = "ISTREAM_VECTOR_DIM"
BACKEND_ENV = "ISTREAM_VECTOR_BACKEND"

FLOAT4_OID = 700
FLOAT4_ARRAY_OID = 1021


class Backend(StrEnum):
    PGVECTOR = "pgvector"
    ARRAY = "array"


def configured_dim(value: int | str | None = None) -> int:
    raw = value if value is not None else os.environ.get(DIM_ENV, DEFAULT_DIM)
    try:
        dim = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{DIM_ENV} must be a whole number, got {raw!r}") from None
    if not 1 <= dim <= 16000:
        raise ValueError(f"{DIM_ENV} must be between 1 and 16000 (pgvector's limit), got {dim}")
    return dim


def choose_backend(conn: Connection, requested: str | None = None) -> Backend:
    """pgvector when the server has it (unless told otherwise), else the real[] fallback."""
    want = (requested or os.environ.get(BACKEND_ENV) or "auto").lower()
    if want not in ("auto", Backend.PGVECTOR, Backend.ARRAY):
        raise ValueError(f"{BACKEND_ENV} must be auto, pgvector or array, got {want!r}")
    if want == Backend.ARRAY:
        return Backend.ARRAY
    available = (
        conn.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).scalar()
        or conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")).scalar()
    )
    if available:
        return Backend.PGVECTOR
    if want == Backend.PGVECTOR:
        raise RuntimeError(f"{BACKEND_ENV}=pgvector but this server has no pgvector extension")
    return Backend.ARRAY


def recorded_backend(conn: Connection) -> Backend:
    """The backend the database was migrated with (before 0002: whatever 0001 created)."""
    if conn.execute(text("SELECT to_regclass('storage_meta')")).scalar() is not None:
        value = conn.execute(text("SELECT value FROM storage_meta WHERE key = 'vector_backend'")).scalar()
        if value:
            return Backend(value)
    udt = conn.execute(
        text(
            "SELECT udt_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'user_interests_current' "
            "AND column_name = 'vector'"
        )
    ).scalar()
    return Backend.PGVECTOR if udt == "vector" else Backend.ARRAY


def recorded_dim(conn: Connection) -> int:
    """The vector width fixed at migration 0002 (`storage_meta`)."""
    value = conn.execute(text("SELECT value FROM storage_meta WHERE key = 'vector_dim'")).scalar()
    if value is None:
        raise RuntimeError("storage_meta records no vector_dim: the schema is older than 0002")
    return int(value)


def sql_type(backend: Backend, dim: int | None) -> str:
    if backend is Backend.PGVECTOR:
        return f"vector({dim})" if dim else "vector"
    return "real[]"


def as_float32(vector: object) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(-1))


class Float4ArrayBinaryDumper(Dumper):
    """Dumps a 1-d numpy vector as a binary `real[]` in one numpy pass (no per-float Python work).

    Postgres' binary array layout: ndim, has-nulls flag, element oid, then per
    dimension (length, lower bound), then each element as (int32 length, value).
    """

    format = Format.BINARY
    oid = FLOAT4_ARRAY_OID

    def dump(self, obj: object) -> bytes:
        values = np.asarray(obj, dtype=">f4").reshape(-1)
        body = np.empty(values.shape[0], dtype=[("len", ">i4"), ("value", ">f4")])
        body["len"] = 4
        body["value"] = values
        return struct.pack(">iiIii", 1, 0, FLOAT4_OID, values.shape[0], 1) + body.tobytes()


class PgvectorBinaryDumper(Dumper):
    """Dumps a 1-d numpy vector in pgvector's binary `vector` format: dim, unused, float4s.

    `oid` is set per database (the extension's type has no fixed oid)."""

    format = Format.BINARY

    def dump(self, obj: object) -> bytes:
        values = np.asarray(obj, dtype=">f4").reshape(-1)
        return struct.pack(">HH", values.shape[0], 0) + values.tobytes()
