"""Writes and reads of versioned interest vectors.

One batch of the worker is one transaction: dedup rows, new versions, the
current-row upsert, user states and the consumed offsets commit together or not
at all, so a crash at any moment leaves Postgres at a batch boundary.

Bulk rows travel by binary COPY into session-local staging tables and move to
their tables in one set-based statement each; the only per-row Python work is
packing a vector into bytes with numpy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import Connection, Engine, String, any_, bindparam, func, select, text
from sqlalchemy.dialects.postgresql import ARRAY, insert

from models.core import ModelSnapshot, UserUpdate
from models.events import Event, Item
from storage.schema import (
    AppliedEvent,
    CatalogItem,
    ConsumedOffset,
    ModelVersion,
    UserCurrentVersion,
    UserInterestCurrent,
    UserState,
)
from storage.vectors import FLOAT4_ARRAY_OID, Backend, Float4ArrayBinaryDumper, PgvectorBinaryDumper

# Batch transactions hold this advisory lock shared and erase_user() holds it
# exclusively (same number as in migration 0002): an erasure waits for batches in
# flight, and every later batch sees its tombstone.
ERASURE_LOCK = 7_315_001

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS istream_stage_events (
    event_id text, user_id text, kind text, item_id text, ts timestamptz, rating float8
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS istream_stage_states (
    user_id text, model_version text, state jsonb
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS istream_stage_items (
    item_id text, vector real[]
) ON COMMIT DELETE ROWS;
"""

# Versions come from the user's pointer row under its row lock (taken in user_id order,
# so two writers cannot deadlock): 1, 2, 3... without gaps or duplicates however many
# workers write. The vector is then written once, by COPY straight into the history;
# the pointer row (and the user_interests_current view over it) names that version with
# the same timestamp, so as-of queries and the current row always agree. Both happen in
# the batch's transaction, so nobody sees a pointer without its history row.
_UPSERT_POINTERS = """
INSERT INTO user_current_versions AS c (user_id, version, n_events, last_event_ts, updated_at)
SELECT u.user_id, 1, u.n_events, u.last_event_ts, clock_timestamp()
FROM unnest(%s::text[], %s::bigint[], %s::timestamptz[]) AS u(user_id, n_events, last_event_ts)
ORDER BY u.user_id
ON CONFLICT (user_id) DO UPDATE SET
    version = c.version + 1,
    n_events = c.n_events + excluded.n_events,
    last_event_ts = greatest(c.last_event_ts, excluded.last_event_ts),
    updated_at = clock_timestamp()
RETURNING c.user_id, c.version, c.n_events, c.last_event_ts, c.updated_at
"""

# Stay well under Postgres' 65,535 bind parameters per statement.
_CHUNK = 2000


def _ts(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, tz=UTC)


def _any(values: Sequence[str]) -> Any:
    """`= ANY(:array)`: one bound parameter however many values (an IN list of thousands of
    placeholders cost more to build and parse than the query took to run)."""
    return any_(bindparam(None, list(values), type_=ARRAY(String)))


def _chunks(rows: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


class PublishedWeights(NamedTuple):
    version: str
    weights: bytes
    sha256: str | None  # None for rows published before migration 0003


@dataclass(frozen=True, slots=True)
class OffsetMark:
    topic: str
    partition: int
    next_offset: int


@dataclass(frozen=True, slots=True)
class Tombstone:
    erased_at: datetime
    drop_until: datetime
    rebuilt: bool  # the user has a current row written after the erasure (a new life)


@dataclass(slots=True)
class Screened:
    """Events that may be learned, and what the erasure rule took out."""

    kept: list[Event]
    dropped: int = 0
    # Users whose model state must be forgotten before learning (erased since last seen).
    forget: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Keep the newest `keep_versions` and everything younger than `keep_all`; beyond that one
    version per UTC hour up to `hourly` old, then one per day."""

    keep_versions: int = 10
    keep_all: timedelta = timedelta(days=1)
    hourly: timedelta = timedelta(days=7)

    @classmethod
    def from_seconds(cls, keep_versions: int, keep_all_s: float, hourly_s: float) -> RetentionPolicy:
        """From settings in seconds; an hourly tier shorter than keep-all is just keep-all."""
        return cls(
            keep_versions=keep_versions,
            keep_all=timedelta(seconds=keep_all_s),
            hourly=timedelta(seconds=max(hourly_s, keep_all_s)),
        )

    def __post_init__(self) -> None:
        if self.keep_versions < 1:
            raise ValueError("retention must keep at least the newest version (keep_versions >= 1)")
        if self.hourly < self.keep_all:
            raise ValueError("the hourly tier must reach at least as far back as keep-all")


@dataclass(slots=True)
class PruneReport:
    user_versions_deleted: int = 0
    item_vectors_deleted: int = 0
    weights_dropped: int = 0
    users_scanned: int = 0


def _staged_connection(conn: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under `conn` (same transaction), with staging tables and the
    numpy-to-real[] COPY dumper."""
    raw: psycopg.Connection[Any] = conn.connection.driver_connection  # type: ignore[assignment]
    raw.execute(_STAGING)
    raw.adapters.register_dumper(None, Float4ArrayBinaryDumper)
    return raw


class VectorStore:
    def __init__(self, engine: Engine, group_id: str = "interest-stream") -> None:
        self.engine = engine
        self.group_id = group_id
        self._meta: dict[str, str] | None = None
        # user -> erased_at of the tombstone whose model state this process has forgotten.
        self._forgotten: dict[str, datetime] = {}

    # ---- what the migrations fixed -------------------------------------------
    def _load_meta(self) -> dict[str, str]:
        if self._meta is None:
            with self.engine.connect() as conn:
                self._meta = {k: v for k, v in conn.execute(text("SELECT key, value FROM storage_meta"))}
        return self._meta

    @property
    def backend(self) -> Backend:
        return Backend(self._load_meta()["vector_backend"])

    @property
    def dim(self) -> int:
        return int(self._load_meta()["vector_dim"])

    def user_hash(self, user_id: str) -> bytes:
        """The tombstone key: sha256(salt || user_id), as erase_user() computes it in SQL."""
        return hashlib.sha256((self._load_meta()["erasure_salt"] + user_id).encode("utf-8")).digest()

    def _vector_oid(self, raw: psycopg.Connection[Any]) -> int:
        """The oid COPY must send vectors as (pgvector's `vector` or real[]), with its binary dumper."""
        if self.backend is Backend.ARRAY:
            return FLOAT4_ARRAY_OID
        oid = self._load_meta().get("_vector_oid")
        if oid is None:
            oid = str(raw.execute("SELECT CAST('vector' AS regtype)::oid").fetchone()[0])  # type: ignore[index]
            self._load_meta()["_vector_oid"] = oid
        dumper = type("PgvectorBinaryDumper", (PgvectorBinaryDumper,), {"oid": int(oid)})
        raw.adapters.register_dumper(None, dumper)
        return int(oid)

    def _check_width(self, what: str, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            width = vectors.shape[-1] if vectors.ndim else 0
            raise ValueError(
                f"{what} have {width} dimensions but this database stores {self.dim} "
                "(ISTREAM_VECTOR_DIM when it was migrated)"
            )

    # ---- reads -------------------------------------------------------------
    def applied_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        if not event_ids:
            return set()
        with self.engine.connect() as conn:
            return set(
                conn.execute(
                    select(AppliedEvent.event_id).where(AppliedEvent.event_id == _any(event_ids))
                ).scalars()
            )

    def current_versions(self, user_ids: Sequence[str]) -> dict[str, int]:
        """user -> the version of their newest stored vector (users without one are left out)."""
        if not user_ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(UserCurrentVersion.user_id, UserCurrentVersion.version).where(
                    UserCurrentVersion.user_id == _any(user_ids)
                )
            ).all()
        return {u: int(v) for u, v in rows}

    def user_states(self, user_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The checkpointed model state of these users (those without one are left out)."""
        if not user_ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(UserState.user_id, UserState.state).where(UserState.user_id == _any(user_ids))
            ).all()
        return {u: st for u, st in rows}

    def stored_offsets(self) -> dict[tuple[str, int], int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ConsumedOffset.topic, ConsumedOffset.partition, ConsumedOffset.next_offset).where(
                    ConsumedOffset.group_id == self.group_id
                )
            ).all()
        return {(t, p): o for t, p, o in rows}

    def current(self, user_id: str) -> UserInterestCurrent | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(UserInterestCurrent).where(UserInterestCurrent.user_id == user_id)
            ).first()
        return row  # type: ignore[return-value]

    def total_events(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(select(func.coalesce(func.sum(UserInterestCurrent.n_events), 0))).scalar_one()
            )

    def load_user_states(self, model_version: str) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(UserState.user_id, UserState.state).where(UserState.model_version == model_version)
            ).all()
        return {u: s for u, s in rows}

    def latest_weights(self, model_spec: str) -> PublishedWeights | None:
        """The newest published weights of a model spec (config["model"]), if any.

        Returned as stored: the caller checks `sha256` (models.weights_io.verify) before loading.
        """
        return self._weights(
            ModelVersion.config["model"].astext == model_spec,
            newest_first=True,
        )

    def weights_of(self, version: str) -> PublishedWeights | None:
        """The weights of one version, as stored (None: no such version, or its weights were dropped)."""
        return self._weights(ModelVersion.model_version == version)

    def _weights(self, *where: Any, newest_first: bool = False) -> PublishedWeights | None:
        """The first version with weights that matches `where` (the newest first, if asked)."""
        query = select(ModelVersion.model_version, ModelVersion.weights, ModelVersion.weights_sha256).where(
            ModelVersion.weights.is_not(None), *where
        )
        if newest_first:
            query = query.order_by(ModelVersion.created_at.desc(), ModelVersion.model_version.desc())
        with self.engine.connect() as conn:
            row = conn.execute(query.limit(1)).first()
        return None if row is None else PublishedWeights(row[0], bytes(row[1]), row[2])

    def load_catalog(self) -> list[Item]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(CatalogItem.item_id, CatalogItem.text, CatalogItem.attrs)).all()
        return [Item(item_id=i, text=t, attrs=a or {}) for i, t, a in rows]

    # ---- catalog and models --------------------------------------------------
    def upsert_items(self, items: Sequence[Item]) -> None:
        if not items:
            return
        latest = {i.item_id: i for i in items}  # the last record of an item wins
        rows = [{"item_id": i.item_id, "text": i.text, "attrs": dict(i.attrs)} for i in latest.values()]
        with self.engine.begin() as conn:
            for chunk in _chunks(rows):
                stmt = insert(CatalogItem).values(list(chunk))
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[CatalogItem.item_id],
                        set_={
                            "text": stmt.excluded.text,
                            "attrs": stmt.excluded.attrs,
                            "updated_at": func.now(),
                        },
                    )
                )

    def write_item_vectors(
        self, model_version: str, item_ids: Sequence[str], vectors: np.ndarray, *, overwrite: bool = True
    ) -> None:
        """Item vectors of a model version; `overwrite=False` only fills in the items it lacks."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(item_ids) != len(vectors):
            raise ValueError(f"{len(item_ids)} item ids but {len(vectors)} vectors")
        if not len(item_ids):
            return
        self._check_width("item vectors", vectors)
        with self.engine.begin() as conn:
            raw = _staged_connection(conn)
            with raw.cursor() as cur:
                with cur.copy("COPY istream_stage_items (item_id, vector) FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(["text", "real[]"])
                    for item_id, vec in zip(item_ids, vectors, strict=True):
                        cp.write_row((item_id, vec))
                on_conflict = "DO UPDATE SET vector = excluded.vector" if overwrite else "DO NOTHING"
                cur.execute(
                    f"""
                    INSERT INTO item_vectors AS t (item_id, model_version, vector)
                    SELECT DISTINCT ON (s.item_id) s.item_id, %s, s.vector
                    FROM istream_stage_items s ORDER BY s.item_id
                    ON CONFLICT (item_id, model_version) {on_conflict}
                    """,
                    (model_version,),
                )

    def publish_model(self, snapshot: ModelSnapshot, base_model: str) -> None:
        """Register a model version and its item vectors (before any user row names it)."""
        self.write_item_vectors(snapshot.version, snapshot.item_ids, snapshot.item_vectors)
        with self.engine.begin() as conn:
            stmt = insert(ModelVersion).values(
                model_version=snapshot.version,
                base_model=base_model,
                config=dict(snapshot.config),
                parent=snapshot.parent,
                metrics=dict(snapshot.metrics),
                weights=snapshot.weights,
                # What a worker checks before loading these weights (models.weights_io.verify).
                weights_sha256=None if snapshot.weights is None else _sha256(snapshot.weights),
                weights_base=snapshot.weights_base,
                prior_vector=snapshot.prior,
            )
            conn.execute(stmt.on_conflict_do_nothing(index_elements=[ModelVersion.model_version]))

    # ---- erasure ----------------------------------------------------------------
    def _tombstones(
        self, conn: Connection | psycopg.Connection[Any], users: Iterable[str]
    ) -> dict[str, Tombstone]:
        users = sorted(set(users))
        if not users:
            return {}
        sql = """
            SELECT x.user_id, t.erased_at, t.drop_until,
                   coalesce((SELECT c.updated_at > t.erased_at FROM user_current_versions c
                             WHERE c.user_id = x.user_id), false)
            FROM unnest(%s::bytea[], %s::text[]) AS x(user_hash, user_id)
            JOIN erased_users t ON t.user_hash = x.user_hash
        """
        if isinstance(conn, Connection):
            raw: psycopg.Connection[Any] = conn.connection.driver_connection  # type: ignore[assignment]
        else:
            raw = conn
        # Nearly always empty: then no hashing at all.
        if not raw.execute("SELECT EXISTS (SELECT 1 FROM erased_users)").fetchone()[0]:  # type: ignore[index]
            return {}
        params = ([self.user_hash(u) for u in users], users)
        return {u: Tombstone(e, d, bool(r)) for u, e, d, r in raw.execute(sql, params)}

    def screen_erased(self, events: Sequence[Event]) -> Screened:
        """The erasure rule, applied before learning (the worker calls this on every batch).

        An erased user's events stamped before the tombstone's `drop_until` are dropped —
        in flight, retried or replayed — and never reach the model or Postgres. The first
        time a tombstone is seen, the user is returned in `forget` so the caller drops the
        model's in-memory state; later events (stamped after drop_until) start from nothing.
        """
        if not events:
            return Screened(kept=list(events))
        with self.engine.connect() as conn:
            tombs = self._tombstones(conn, (e.user_id for e in events))
        if not tombs:
            return Screened(kept=list(events))
        kept = [e for e in events if e.user_id not in tombs or _ts(e.ts) >= tombs[e.user_id].drop_until]
        forget = {u for u, t in tombs.items() if not t.rebuilt and self._forgotten.get(u) != t.erased_at}
        self._forgotten.update({u: tombs[u].erased_at for u in forget})
        return Screened(kept=kept, dropped=len(events) - len(kept), forget=forget)

    def erase_user(self, user_id: str, grace: timedelta = timedelta(0)) -> dict[str, int]:
        """Remove every row of the user in one transaction, leave a tombstone and an audit row.

        Events of the user stamped up to `grace` after now are dropped by the worker too
        (clock skew, events still on their way). Returns rows deleted per table.
        """
        with self.engine.begin() as conn:
            counts = conn.execute(
                text("SELECT erase_user(:u, now() + make_interval(secs => :g))"),
                {"u": user_id, "g": grace.total_seconds()},
            ).scalar_one()
        return {k: int(v) for k, v in counts.items()}

    # ---- retention --------------------------------------------------------------
    def prune(
        self,
        policy: RetentionPolicy,
        *,
        now: datetime | None = None,
        users_per_step: int = 5000,
        progress: bool = False,
    ) -> PruneReport:
        """Thin the history by `policy`, a slice of users per transaction (short locks, steady WAL)."""
        from tqdm import tqdm

        report = PruneReport()
        with self.engine.connect() as conn:
            total = conn.execute(text("SELECT count(*) FROM user_current_versions")).scalar_one()
        bar = tqdm(total=total, unit="user", desc="prune", disable=not progress)
        after: str | None = None
        while True:
            with self.engine.begin() as conn:
                ids = list(
                    conn.execute(
                        text(
                            "SELECT user_id FROM user_current_versions "
                            "WHERE (CAST(:after AS text) IS NULL OR user_id > :after) "
                            "ORDER BY user_id LIMIT :n"
                        ),
                        {"after": after, "n": users_per_step},
                    ).scalars()
                )
                if not ids:
                    break
                last = len(ids) < users_per_step
                report.user_versions_deleted += conn.execute(
                    text(
                        "SELECT prune_user_vectors(:k, make_interval(secs => :all), "
                        "make_interval(secs => :hourly), :lo, :hi, coalesce(:now, now()))"
                    ),
                    {
                        "k": policy.keep_versions,
                        "all": policy.keep_all.total_seconds(),
                        "hourly": policy.hourly.total_seconds(),
                        # The first slice starts at the bottom and the last is open-ended, so
                        # history rows of users without a current row are covered as well.
                        "lo": after,
                        "hi": None if last else ids[-1],
                        "now": now,
                    },
                ).scalar_one()
            report.users_scanned += len(ids)
            bar.update(len(ids))
            if last:
                break
            after = ids[-1]
        with self.engine.begin() as conn:
            report.item_vectors_deleted = conn.execute(
                text("SELECT prune_item_vectors(make_interval(secs => :all), coalesce(:now, now()))"),
                {"all": policy.keep_all.total_seconds(), "now": now},
            ).scalar_one()
            report.weights_dropped = self._drop_old_weights(conn, policy.keep_versions)
        bar.close()
        return report

    @staticmethod
    def _drop_old_weights(conn: Connection, keep: int) -> int:
        """Null the weights of all but each model's newest `keep` versions that have them.

        Only a model's newest weights are ever loaded (a worker at start or taking the trainer
        role, `istream explain`); the others are kept for an operator's rollback. A trainer
        publishes every few seconds while it learns, about 1.2 MB for ML-100K's catalog each
        time: without this, `model_versions` grows by gigabytes a day. The row stays (lineage,
        config, metrics, prior), and so do the item vectors that user rows still need. So do
        the weights a kept version builds on (`weights_base`: its co-occurrence checkpoint).
        """
        return conn.execute(
            text(
                """
                WITH r AS (
                    SELECT model_version, weights_base, row_number() OVER (
                        PARTITION BY config->>'model' ORDER BY created_at DESC, model_version DESC
                    ) AS newest
                    FROM model_versions WHERE weights IS NOT NULL
                )
                UPDATE model_versions m SET weights = NULL, weights_sha256 = NULL
                FROM r
                WHERE m.model_version = r.model_version AND r.newest > :keep
                  AND m.model_version NOT IN (
                      SELECT weights_base FROM r WHERE r.newest <= :keep AND weights_base IS NOT NULL
                  )
                """
            ),
            {"keep": keep},
        ).rowcount

    # ---- SQL functions, from Python ---------------------------------------------
    def vector_as_of(
        self, user_id: str, at: datetime, by_event_time: bool = False
    ) -> tuple[int, np.ndarray] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                text("SELECT version, CAST(vector AS real[]) FROM user_vector_as_of(:u, :at, :ev)"),
                {"u": user_id, "at": at, "ev": by_event_time},
            ).first()
        return None if row is None else (int(row[0]), np.asarray(row[1], dtype=np.float32))

    def top_items(self, user_id: str, k: int = 10, skip_seen: bool = False) -> list[tuple[str, float]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT item_id, score FROM user_top_items(:u, :k, :s)"),
                {"u": user_id, "k": k, "s": skip_seen},
            ).all()
        return [(i, float(s)) for i, s in rows]

    def similar_users(self, user_id: str, k: int = 10) -> list[tuple[str, float]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT user_id, similarity FROM similar_users(:u, :k)"), {"u": user_id, "k": k}
            ).all()
        return [(u, float(s)) for u, s in rows]

    # ---- the batch transaction -------------------------------------------------
    def commit_batch(
        self,
        model_version: str,
        updates: Mapping[str, UserUpdate],
        events: Sequence[Event],
        offsets: Sequence[OffsetMark] = (),
        user_states: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> dict[str, int]:
        """Apply one batch atomically; returns user_id -> the version written.

        A user erased while the batch was being learned is left out (no version, no
        state, no applied events): see `screen_erased` for the rule.
        """
        ordered = [updates[u] for u in sorted(updates)]
        if ordered:
            self._check_width("user vectors", np.stack([np.asarray(u.vector, np.float32) for u in ordered]))
        versions: dict[str, int] = {}
        with self.engine.begin() as conn:
            raw = _staged_connection(conn)
            # Before any cursor exists: cursors copy the connection's dumpers when made.
            vector_oid = self._vector_oid(raw)
            raw.execute("SELECT pg_advisory_xact_lock_shared(%s)", (ERASURE_LOCK,))
            # Read after taking the lock: an erasure that committed meanwhile is visible now.
            tombs = self._tombstones(raw, [*updates, *(e.user_id for e in events), *(user_states or {})])
            if tombs:
                blocked = {
                    u for u, t in tombs.items() if not t.rebuilt and self._forgotten.get(u) != t.erased_at
                }
                events = [
                    e
                    for e in events
                    if e.user_id not in tombs
                    or (e.user_id not in blocked and _ts(e.ts) >= tombs[e.user_id].drop_until)
                ]
                ordered = [u for u in ordered if u.user_id not in blocked]
                user_states = {u: s for u, s in (user_states or {}).items() if u not in blocked}
            with raw.cursor() as cur:
                if events:
                    with cur.copy(
                        "COPY istream_stage_events (event_id, user_id, kind, item_id, ts, rating) "
                        "FROM STDIN (FORMAT BINARY)"
                    ) as cp:
                        cp.set_types(["text", "text", "text", "text", "timestamptz", "float8"])
                        for e in events:
                            rating = None if e.rating is None else float(e.rating)
                            cp.write_row((e.event_id, e.user_id, e.kind, e.target_item, _ts(e.ts), rating))
                    cur.execute(
                        "INSERT INTO applied_events (event_id, user_id, kind, item_id, ts, rating) "
                        "SELECT * FROM istream_stage_events ON CONFLICT DO NOTHING"
                    )
                if ordered:
                    pointers = cur.execute(
                        _UPSERT_POINTERS,
                        (
                            [u.user_id for u in ordered],
                            [int(u.n_applied) for u in ordered],
                            [_ts(u.last_event_ts) for u in ordered],
                        ),
                    ).fetchall()
                    by_user = {u.user_id: u for u in ordered}
                    with cur.copy(
                        "COPY user_interest_vectors (user_id, version, model_version, vector, n_events, "
                        "last_event_ts, created_at, cold_start) FROM STDIN (FORMAT BINARY)"
                    ) as cp:
                        cp.set_types(
                            [
                                "text",
                                "int4",
                                "text",
                                vector_oid,
                                "int8",
                                "timestamptz",
                                "timestamptz",
                                "text",
                            ]
                        )
                        for user_id, version, n_events, last_ts, at in pointers:
                            u = by_user[user_id]
                            cp.write_row(
                                (
                                    user_id,
                                    version,
                                    model_version,
                                    u.vector,
                                    n_events,
                                    last_ts,
                                    at,
                                    u.cold_start,
                                )
                            )
                    versions = {p[0]: p[1] for p in pointers}
                if user_states:
                    with cur.copy(
                        "COPY istream_stage_states (user_id, model_version, state) FROM STDIN (FORMAT BINARY)"
                    ) as cp:
                        cp.set_types(["text", "text", "jsonb"])
                        for u in sorted(user_states):
                            cp.write_row((u, model_version, Jsonb(dict(user_states[u]))))
                    cur.execute(
                        """
                        INSERT INTO user_states AS t (user_id, model_version, state)
                        SELECT s.user_id, s.model_version, s.state FROM istream_stage_states s
                        ORDER BY s.user_id
                        ON CONFLICT (user_id) DO UPDATE SET
                            model_version = excluded.model_version, state = excluded.state,
                            updated_at = now()
                        """
                    )
                if offsets:
                    cur.executemany(
                        """
                        INSERT INTO consumed_offsets AS t (group_id, topic, partition, next_offset)
                        VALUES (%s, %s, %s, %s)
                        ON CONFLICT (group_id, topic, partition) DO UPDATE SET
                            next_offset = greatest(t.next_offset, excluded.next_offset),
                            updated_at = now()
                        """,
                        [(self.group_id, o.topic, o.partition, o.next_offset) for o in offsets],
                    )
        return versions
