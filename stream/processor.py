"""One micro-batch, from raw Kafka records to committed vectors. Broker-agnostic.

The Faust agents stay thin: they hand raw records here. The same object can be
driven by any consumer, which is what the tests do to exercise it directly.

Why a batch is applied exactly once, whatever crashes:

- the batch's consumed offsets commit in the same transaction as its vectors
  (`VectorStore.commit_batch`), and the worker seeks to those offsets on every
  partition assignment, so Postgres alone says what is done;
- the partitions of a batch are locked (a Postgres advisory lock) from the dedup
  check to the commit, so a worker that lost its partitions but still holds a
  batch (a zombie after a broker cut) and the new owner never both apply an event;
- every user's model state is checkpointed in the same transaction, and before
  learning, users whose stored version moved on (another worker, a failed
  attempt) are reloaded from that checkpoint. A failed attempt forgets the
  users it touched, so a retry starts from what Postgres holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, select, text

from models import weights_io
from models.catalog import item_text
from models.core import InterestModel, ModelSnapshot, TrainableWeights, UserUpdate
from models.events import Event, Item
from models.weights_io import WeightsRejected
from storage.encodings import model_encoder, persist_encodings, restore_encodings
from storage.repository import OffsetMark, VectorStore
from storage.schema import CatalogItem
from stream.records import BatchOutcome, RawRecord, dead_letter
from stream.schema import InvalidRecord, Limits, parse_topic_record

log = logging.getLogger(__name__)


DeadLetterSink = Callable[[list[dict[str, Any]]], None]


class ShuttingDown(Exception):
    """The worker is stopping: a wait or a retry was given up, and the batch stays uncommitted
    (it is re-read from Postgres' offsets on restart)."""


class SystemicFailure(Exception):
    """A failure no record explains: the worker stops consuming, with offsets uncommitted.

    Raised for any error of the model step (models accept every record the validator
    passes, so a model error is a bug or a configuration mistake, such as a shape error
    after a config change), and by the runner for errors that are neither transient nor
    a value Postgres rejects (docs/stream.md, "Poison or systemic"). Dead-lettering on such
    an error would divert valid events from learning, one "poison" record after another.
    """

    def __init__(self, where: str, cause: BaseException) -> None:
        first = str(cause).splitlines()[0][:300] if str(cause) else ""
        super().__init__(f"{where}: {type(cause).__name__}: {first}")
        self.where = where
        self.cause = cause


@contextmanager
def model_step(what: str) -> Iterator[None]:
    """Errors raised by the model inside are systemic, whichever records it was given."""
    try:
        yield
    except (ShuttingDown, SystemicFailure):
        raise
    except Exception as exc:
        raise SystemicFailure(f"model step ({what})", exc) from exc


def offset_marks(records: Sequence[RawRecord]) -> list[OffsetMark]:
    nxt: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        nxt[key] = max(nxt.get(key, 0), r.offset + 1)
    return [OffsetMark(t, p, o) for (t, p), o in sorted(nxt.items())]


class AdvisoryLocks:
    """Session advisory locks held on one connection (a batch's partitions, or the trainer role);
    a batch's are released by whichever thread commits it."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def release(self) -> None:
        try:
            self.conn.execute(text("SELECT pg_advisory_unlock_all()"))
            self.conn.commit()
        except Exception:  # a dead connection has released them already
            self.conn.invalidate()
        finally:
            self.conn.close()


@dataclass
class StagedBatch:
    """A batch learned but not yet committed: what `commit` writes and `finish` accounts for.

    Holds its partitions' locks from before the dedup check until the commit ends.
    """

    records: Sequence[RawRecord]
    lock: AdvisoryLocks
    outcome: BatchOutcome
    users: list[str]
    fresh: list[tuple[RawRecord, Event]]  # the events to apply, with the records they came from
    updates: Mapping[str, UserUpdate]
    states: dict[str, Any]
    model_version: str
    loss: float | None
    started: float

    @property
    def events(self) -> list[Event]:
        return [e for _, e in self.fresh]


class BatchProcessor:
    """Validate, deduplicate, learn, and commit one batch in one transaction.

    `process` does it all in one call. The worker splits it to overlap a batch's
    commit with the learning of the next (of other partitions): `stage` learns
    (model thread), `commit` writes (any thread; touches no model state), `finish`
    accounts for the commit (model thread), and `abandon` undoes a failed commit's
    effect on memory (model thread), after which the batch is simply processed again.
    """

    def __init__(
        self,
        model: InterestModel,
        store: VectorStore,
        topic_kinds: dict[str, str],
        limits: Limits,
        base_model: str,
        dead_letter_sink: DeadLetterSink | None = None,
        on_weights_refused: Callable[[str, WeightsRejected], None] | None = None,
    ) -> None:
        self.model = model
        self.store = store
        self.topic_kinds = topic_kinds
        self.limits = limits
        self.base_model = base_model
        # Called with the batch's dead letters *before* its offsets commit, so a
        # crash in between re-sends them (at least once) rather than losing them.
        self.dead_letter_sink = dead_letter_sink
        self._published: set[str] = set()
        # Versions learned here and not yet written to the registry: `commit` writes them (on
        # the commit thread, before the rows that may name them), so the model thread goes on
        # learning instead of waiting for Postgres. In learning order.
        self._unwritten: dict[str, ModelSnapshot] = {}
        self._unwritten_lock = threading.Lock()
        # Published weights that failed the format or checksum check: never tried again.
        self.on_weights_refused = on_weights_refused
        self.refused_weights: dict[str, str] = {}  # version -> reason
        self._versions: dict[str, int] = {}  # user -> stored version our in-memory state matches
        self._catalog_mark: tuple[int, datetime | None] = (0, None)
        self._catalog_checked = float("-inf")
        # What the model and the store hold of each item: a record that changes nothing (the
        # topic re-read after the catalog bootstrap, our own items seen again by
        # refresh_catalog's slack) costs nothing, instead of rewriting every recent item.
        self._known_items: dict[str, Item] = {}
        # One trainer per model: only this process trains shared parameters and
        # publishes snapshots; the others follow the registry (see set_trainer).
        self.trainer = True
        self._trainer_conn: Connection | None = None
        # The worker's stop signal: a lock wait gives up (ShuttingDown) once it says so, so a
        # stop never hangs behind a lock that another batch or worker holds.
        self.should_stop: Callable[[], bool] = lambda: False

    # ---- start-up ------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from Postgres: base encodings, catalog, the newest trainable weights, the registry."""
        encoder = model_encoder(self.model)
        if encoder is not None:
            log.info("restored %d base encodings", restore_encodings(self.store.engine, encoder))
        if self.refresh_catalog():
            self.persist_encodings()
        self.restore_weights()
        self.ensure_published()

    def bootstrap_catalog(self, items: Sequence[Item], chunk: int = 2000) -> int:
        """Apply the catalog read from the items topic before any event is learned.

        Kafka orders records within a partition, not across topics: under a backlog the
        consumer may hand over thousands of events before the catalog they name (measured: the
        first 21,700 of 100,000 ML-100K ratings, learned with no item known and served as a
        random guess). Offsets are not touched: the consumer reads these records again and
        applies them as usual (an upsert), and an invalid one is dead-lettered then.
        """
        for i in range(0, len(items), chunk):
            self.apply_items(items[i : i + chunk])
        return len(items)

    def persist_encodings(self, items: Sequence[Item] | None = None) -> None:
        """Keep catalog texts' base encodings across restarts (stored rows are skipped).

        With `items`, only their texts are written: a catalog update must not rewrite the
        whole cache. Without, everything the cache holds (after a restore).
        """
        encoder = model_encoder(self.model)
        if encoder is None:
            return
        texts = None if items is None else {item_text(i.text, i.attrs) for i in items}
        persist_encodings(self.store.engine, encoder, texts)

    def _verified_weights(self, version: str) -> bytes | None:
        """Another version's weights, for weights that build on them; None when they are gone or
        fail their checksum (logged: the model then goes on without them)."""
        saved = self.store.weights_of(version)
        if saved is None:
            return None
        try:
            weights_io.verify(saved.weights, saved.sha256)
        except WeightsRejected as exc:
            log.error("refused the weights of model version %s (%s: %s)", version, exc.kind, exc.reason)
            return None
        return saved.weights

    def restore_weights(self, again: bool = False) -> None:
        """Load the newest published weights of this model, when it has trainable state.

        Such models are `TrainableWeights` (`load_weights` takes the bytes their snapshots carry) and
        then report the loaded version as their `model_version`. A blob whose SHA-256 is
        not the one recorded at publish, or that is not tensors-only (models.weights_io), is
        refused: logged, counted, never tried again, and the model keeps the version it has.
        """
        if not isinstance(self.model, TrainableWeights):
            return
        saved = self.store.latest_weights(str(self.model.config().get("model", self.model.name)))
        if saved is None or saved.version in self.refused_weights:
            return
        if saved.version == self.model.model_version and not again:
            return
        try:
            weights_io.verify(saved.weights, saved.sha256)
            self.model.load_weights(saved.weights, self._verified_weights)
        except WeightsRejected as exc:
            self.refused_weights[saved.version] = exc.reason
            log.error(
                "refused the weights of model version %s (%s: %s); keeping model version %s",
                saved.version,
                exc.kind,
                exc.reason,
                self.model.model_version,
            )
            if self.on_weights_refused is not None:
                self.on_weights_refused(saved.version, exc)
            return
        self._published.add(saved.version)
        # Its publisher may not have known every item we know (catalog partitions are
        # spread over the workers): fill in the ones it lacks, keep the ones it wrote.
        self.write_item_vectors(list(self.model.item_ids()), overwrite=False)
        log.info("loaded trainable weights of %s", saved.version)

    def set_trainer(self, wanted: bool) -> None:
        """Scale-out: one worker at a time trains shared parameters and publishes versions.

        The owner of partition 0 wants the role, and has it only while it holds the
        group's trainer lock (a session advisory lock): during a rebalance the previous
        trainer may still be finishing a batch, and two trainers would fork the line of
        versions. On taking the role a worker first loads the newest published weights,
        so the line goes on from there. The others keep their users' state current
        against the newest published snapshot, which they load before every batch, so
        every vector names a version whose item vectors are in the registry and all
        workers converge on the trainer's space within one batch. Models with shared
        trainable parameters honour `InterestModel.train_shared`.
        """
        holds = self._trainer_lock(wanted)
        self.model.train_shared = holds
        if holds and not self.trainer:
            # Again even when it is the version we follow: a follower loads only what serving
            # needs, a trainer also what training goes on from (the co-occurrence counts).
            self.restore_weights(again=True)
        self.trainer = holds

    def _trainer_lock(self, wanted: bool) -> bool:
        if not wanted:
            self._release_trainer_lock()
            return False
        if self._trainer_conn is None:
            self._trainer_conn = self.store.engine.connect()
        try:
            # Re-taking a lock the session holds succeeds; it also proves the session (and
            # so the lock) is still alive: a Postgres restart drops both.
            got = self._trainer_conn.execute(
                text("SELECT pg_try_advisory_lock(hashtext(:g), -1)"), {"g": self.store.group_id}
            ).scalar_one()
            self._trainer_conn.commit()
        except Exception as exc:
            log.warning("trainer lock: %s; following the registry for now", str(exc).splitlines()[0][:200])
            self._release_trainer_lock()
            return False
        return bool(got)

    def close(self) -> None:
        """Let go of what this processor holds in Postgres (the trainer lock's session)."""
        self._release_trainer_lock()

    def _release_trainer_lock(self) -> None:
        conn, self._trainer_conn = self._trainer_conn, None
        if conn is None:
            return
        try:
            # The next trainer goes on from the newest stored version: ours must be there first,
            # or the line of versions would fork at the one the commit thread has not written yet.
            self.write_versions()
        except Exception as exc:
            log.warning("versions not written before giving up training: %s", str(exc).splitlines()[0][:200])
        finally:
            AdvisoryLocks(conn).release()

    def refresh_catalog(self, min_interval_s: float = 0.0) -> int:
        """Pick up catalog items that any worker stored since we last looked (cheap when none)."""
        now = time.monotonic()
        if now - self._catalog_checked < min_interval_s:
            return 0
        self._catalog_checked = now
        with self.store.engine.connect() as conn:
            n, newest = conn.execute(select(func.count(), func.max(CatalogItem.updated_at))).one()
            if (n, newest) == self._catalog_mark:
                return 0
            query = select(CatalogItem.item_id, CatalogItem.text, CatalogItem.attrs)
            since = self._catalog_mark[1]
            if since is not None:
                # now() is a transaction's start time: leave slack for one that committed late.
                query = query.where(CatalogItem.updated_at >= since - timedelta(seconds=30))
            rows = conn.execute(query).all()
        self._catalog_mark = (n, newest)
        # The catalog table holds no embeddings: an item we know with the same text and
        # attributes is ours (or unchanged), and re-applying it would drop its embedding.
        items = [
            Item(item_id=i, text=t, attrs=a or {})
            for i, t, a in rows
            if (known := self._known_items.get(i)) is None or (known.text, known.attrs) != (t, a or {})
        ]
        if items:
            with model_step("catalog"):
                self.model.upsert_items(items)
            if self.model.model_version in self._published:
                # The version our vectors name was published before we knew these items:
                # without their vectors under it, they could never rank for those users.
                self.write_item_vectors([i.item_id for i in items])
            self._remember(items)
        return len(items)

    def ensure_published(self) -> None:
        """Register the model version and its item vectors before a user row can name it."""
        version = self.model.model_version
        if version in self._published:
            return
        with model_step("snapshot"):
            snapshot = self.model.snapshot()
        self.store.publish_model(snapshot, self.base_model)
        self._published.add(version)

    # ---- one batch -----------------------------------------------------------------------
    def _parse(
        self, records: Sequence[RawRecord]
    ) -> tuple[list[tuple[RawRecord, Event | Item]], list[dict[str, Any]]]:
        good: list[tuple[RawRecord, Event | Item]] = []
        bad: list[dict[str, Any]] = []
        for rec in records:
            kind = self.topic_kinds.get(rec.topic)
            if kind is None:
                bad.append(dead_letter(rec, f"topic {rec.topic!r} carries no known record type"))
                continue
            if rec.value is None:
                bad.append(dead_letter(rec, "empty record (no value)"))
                continue
            try:
                parsed = parse_topic_record(rec.value, kind, self.limits)
            except InvalidRecord as exc:
                bad.append(dead_letter(rec, exc.reason))
                continue
            good.append((rec, parsed))
        return good, bad

    def lock_partitions(self, partitions: Sequence[int]) -> AdvisoryLocks:
        """Serialise batches of the same partitions across workers (session advisory locks).

        A user's events share one partition number on every topic, so the number alone
        is the key. A killed worker's locks vanish with its connection.
        """
        conn = self.store.engine.connect()
        try:
            for p in sorted(set(partitions)):  # one order everywhere: no deadlock
                self._wait_lock(conn, p)
            conn.commit()
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        return AdvisoryLocks(conn)

    def _wait_lock(self, conn: Connection, partition: int) -> None:
        """Take one partition's lock, polling: a blocking pg_advisory_lock could not be given
        up when the worker stops (it waited forever behind a batch whose commit was queued
        behind it: issue 12). The polls back off to 100 ms, which only a contended lock pays."""
        delay = 0.005
        while True:
            got = conn.execute(
                text("SELECT pg_try_advisory_lock(hashtext(:g), :p)"),
                {"g": self.store.group_id, "p": partition},
            ).scalar_one()
            if got:
                return
            if self.should_stop():
                raise ShuttingDown(f"stopped waiting for partition {partition}'s lock")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    @contextmanager
    def partition_lock(self, partitions: Sequence[int]) -> Iterator[None]:
        lock = self.lock_partitions(partitions)
        try:
            yield
        finally:
            lock.release()

    def sync_users(self, user_ids: Sequence[str]) -> int:
        """Reload users whose stored version differs from the one our memory holds."""
        ids = sorted(set(user_ids))
        if not ids:
            return 0
        current = self.store.current_versions(ids)
        stale = [u for u in ids if self._versions.get(u) != current.get(u)]
        states = self.store.user_states(stale)
        for u in stale:
            with model_step("restore user state"):
                if u in states:
                    self.model.set_user_state(u, states[u])
                else:
                    self.model.forget_user(u)
            if u in current:
                self._versions[u] = current[u]
            else:
                self._versions.pop(u, None)
        return len(stale)

    def invalidate(self, user_ids: Sequence[str]) -> None:
        """After a failed attempt: memory may be ahead of Postgres for these users."""
        for u in user_ids:
            self.model.forget_user(u)
            self._versions.pop(u, None)

    def process(self, records: Sequence[RawRecord]) -> BatchOutcome:
        """One attempt at one batch: all of its effects commit together, or none do."""
        staged = self.stage(records)
        try:
            versions = self.commit(staged)
        except BaseException:
            self.abandon(staged)
            raise
        return self.finish(staged, versions)

    def stage(self, records: Sequence[RawRecord]) -> StagedBatch:
        """Lock, validate, deduplicate, screen and learn a batch; nothing of it is stored yet."""
        started = time.perf_counter()
        good, bad = self._parse(records)
        outcome = BatchOutcome(dead_letters=bad)
        items = [p for _, p in good if isinstance(p, Item)]
        pairs = [(r, p) for r, p in good if isinstance(p, Event)]
        users = sorted({e.user_id for _, e in pairs})
        lock = self.lock_partitions([r.partition for r in records])
        try:
            if items:
                self.apply_items(items)
                outcome.items = len(items)
            # Items stored by other workers (their partitions of the catalog topic); always
            # before this batch publishes a version, so the one it supersedes has them too.
            self.refresh_catalog(min_interval_s=0.0 if items or self.model.publish_due(len(pairs)) else 2.0)
            if not self.trainer:
                self.restore_weights()
            self.sync_users(users)
            # Dedup against what is already applied, and within the batch itself.
            seen = self.store.applied_event_ids([e.event_id for _, e in pairs])
            fresh: list[tuple[RawRecord, Event]] = []
            for rec, e in pairs:
                if e.event_id in seen:
                    outcome.duplicates += 1
                    continue
                seen.add(e.event_id)
                fresh.append((rec, e))
            # Erasure rule (docs/storage.md): an erased user's older events are dropped, not learned.
            screened = self.store.screen_erased([e for _, e in fresh])
            for user_id in screened.forget:
                self.model.forget_user(user_id)
            kept = {e.event_id for e in screened.kept}
            fresh = [(r, e) for r, e in fresh if e.event_id in kept]
            outcome.erased = screened.dropped
            # Event time orders a user's events; ties keep arrival order (sort is stable).
            fresh.sort(key=lambda pair: pair[1].ts)
            events = [e for _, e in fresh]
            with model_step("learn"):
                result = self.model.learn(events) if events else None
            dp = self.model.privacy_state()
            if dp:
                outcome.dp_epsilon = dp["dp_epsilon"]
                outcome.dp_exhausted = bool(dp["dp_budget_exhausted"])
            if result is not None and result.snapshot is not None:
                with self._unwritten_lock:
                    self._unwritten[result.snapshot.version] = result.snapshot
                self._published.add(result.snapshot.version)
                # Items other workers stored since we last looked go under the new version too.
                self.refresh_catalog()
            self.ensure_published()
            if bad and self.dead_letter_sink is not None:
                self.dead_letter_sink(bad)
            updates = result.updates if result else {}
            with model_step("user state"):
                states = {u: s for u in updates if (s := self.model.get_user_state(u)) is not None}
        except BaseException:
            self.invalidate(users)
            lock.release()
            raise
        return StagedBatch(
            records=records,
            lock=lock,
            outcome=outcome,
            users=users,
            fresh=fresh,
            updates=updates,
            states=states,
            model_version=result.model_version if result else self.model.model_version,
            loss=result.loss if result else None,
            started=started,
        )

    def commit(self, staged: StagedBatch) -> dict[str, int]:
        """Write a staged batch in one transaction and release its locks; user -> version written.

        Model versions learned so far are registered first: a user row may name one only
        once it and its item vectors are stored.
        """
        try:
            self.write_versions()
            versions = self.store.commit_batch(
                model_version=staged.model_version,
                updates=staged.updates,
                events=staged.events,
                offsets=offset_marks(staged.records),
                user_states=staged.states,
            )
        finally:
            staged.lock.release()
        staged.outcome.committed_at = time.time()  # freshness ends here, not when accounted for
        return versions

    def write_versions(self) -> None:
        """Register the versions learned and not yet stored, oldest first (any thread)."""
        with self._unwritten_lock:
            pending = list(self._unwritten.values())
        for snapshot in pending:
            self.store.publish_model(snapshot, self.base_model)  # idempotent: a retry may repeat it
            with self._unwritten_lock:
                self._unwritten.pop(snapshot.version, None)

    def abandon(self, staged: StagedBatch) -> None:
        """The commit failed: memory is ahead of Postgres for the batch's users."""
        self.invalidate(staged.users)

    def finish(self, staged: StagedBatch, versions: Mapping[str, int]) -> BatchOutcome:
        """Account for a committed batch (model thread)."""
        # Erased while this batch was learning: nothing was stored for them; forget them too.
        for user_id in set(staged.updates) - set(versions):
            self.model.forget_user(user_id)
        self._versions.update(versions)
        outcome = staged.outcome
        events = staged.events
        outcome.applied = len(events)
        outcome.users = len(staged.updates)
        outcome.loss = staged.loss
        outcome.model_version = staged.model_version
        outcome.event_ts = [e.ts for e in events]
        outcome.record_ts = [r.timestamp_ms / 1000.0 for r, _ in staged.fresh if r.timestamp_ms]
        outcome.max_event_ts = max(outcome.event_ts, default=None)
        outcome.seconds = time.perf_counter() - staged.started
        return outcome

    def skip(self, records: Sequence[RawRecord], reason: str) -> BatchOutcome:
        """Dead-letter records that cannot be processed at all (a poison record) and move past them."""
        entries = [dead_letter(r, reason) for r in records]
        with self.partition_lock([r.partition for r in records]):
            if self.dead_letter_sink is not None:
                self.dead_letter_sink(entries)
            self.store.commit_batch(
                model_version=self.model.model_version, updates={}, events=[], offsets=offset_marks(records)
            )
        return BatchOutcome(dead_letters=entries, committed_at=time.time())

    def _remember(self, items: Sequence[Item]) -> None:
        self._known_items.update((i.item_id, i) for i in items)

    def apply_items(self, items: Sequence[Item]) -> None:
        latest = [i for i in {i.item_id: i for i in items}.values() if self._known_items.get(i.item_id) != i]
        if not latest:
            return
        with model_step("catalog"):
            self.model.upsert_items(latest)
        self.store.upsert_items(latest)
        self.persist_encodings(latest)
        self.ensure_published()
        self.write_item_vectors([i.item_id for i in latest])
        self._remember(latest)

    def write_item_vectors(self, item_ids: Sequence[str], *, overwrite: bool = True) -> None:
        """These items' vectors under the model version that user vectors name now."""
        with model_step("item vectors"):
            ids = self.model.item_ids()
            index = {item_id: row for row, item_id in enumerate(ids)}
            rows = [index[i] for i in item_ids if i in index]
            matrix = self.model.item_matrix()[rows]
        self.store.write_item_vectors(
            self.model.model_version, [ids[r] for r in rows], matrix, overwrite=overwrite
        )
