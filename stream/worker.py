"""The Faust worker: a thin agent feeds per-partition batches to `BatchProcessor` in one thread.

Delivery from Kafka is treated as at-least-once; Postgres is the source of
truth. On every partition assignment the worker seeks each partition to the
offset stored in Postgres with the vectors (not to Kafka's committed offset),
and every batch is atomic and idempotent (stream/processor.py), so crashes,
rebalances and retries neither lose nor double an event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import faust
from tenacity import AsyncRetrying, Retrying, retry_if_exception, wait_exponential_jitter

from storage.db import upgrade
from stream.batcher import PartitionBatcher
from stream.logs import logging_config
from stream.metrics import WorkerMetrics, serve
from stream.processor import BatchProcessor, StagedBatch
from stream.records import BatchOutcome, RawRecord, encode_dead_letter
from stream.resilience import ResilientRunner, ShuttingDown, SystemicFailure, is_transient
from stream.runtime import (
    base_model_name,
    build_encoder,
    build_interest_model,
    build_store,
    limits,
    published_dim,
    retention_policy,
    settle_heap,
    vector_width,
)
from stream.settings import Settings
from stream.topics import read_catalog

log = logging.getLogger("istream.worker")

# Exit status after ISTREAM_SYSTEMIC_MAX_ATTEMPTS systemic failures (EX_SOFTWARE, sysexits.h):
# distinct from a crash (1) so that an orchestrator or a person can tell them apart.
EXIT_SYSTEMIC = 70


def _raw(event: Any) -> RawRecord:
    msg = event.message
    return RawRecord(
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        key=msg.key,
        value=msg.value,
        timestamp_ms=int(msg.timestamp * 1000) if msg.timestamp else None,
    )


class DeadLetterProducer:
    """Synchronous dead-letter sends from the training thread; each send waits for the broker's ack."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._producer: Any = None

    def __call__(self, entries: list[dict[str, Any]]) -> None:
        from stream.broker import make_producer

        if self._producer is None:
            self._producer = make_producer(self.bootstrap, max_block_ms=10_000, request_timeout_ms=10_000)
        futures = [
            self._producer.send(
                self.topic,
                key=(e.get("key") or "").encode("utf-8") or None,
                value=encode_dead_letter(e),
            )
            for e in entries
        ]
        for f in futures:
            f.get(timeout=15)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)


class WorkerRuntime:
    """What the agent, the timers and the rebalance hooks share (one per process)."""

    def __init__(self, settings: Settings, bootstrap: str, database_url: str) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.database_url = database_url
        self.topic_kinds = {**settings.event_topics, settings.topic_items: "item"}
        self.store = build_store(settings, database_url)
        # One thread runs everything that touches the model, in order (it is not
        # thread-safe), and the event loop stays free for heartbeats and fetching. A second
        # thread writes a learned batch to Postgres while the next one learns
        # (ISTREAM_PIPELINE_COMMITS); it touches no model state.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="istream-train")
        self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="istream-commit")
        self._inflight: tuple[list[RawRecord], StagedBatch, asyncio.Future[dict[str, int]]] | None = None
        self.batcher = PartitionBatcher(
            settings.batch_size,
            settings.batch_seconds,
            settings.max_pending_records,
            is_catalog=lambda topic: topic == settings.topic_items,
        )
        self.metrics = WorkerMetrics()
        self.dead_letters = DeadLetterProducer(bootstrap, settings.topic_dead_letter)
        self._stop_deadline: float | None = None
        # Shutdown has one owner of the batcher at a time: `pump` until it has stopped, then
        # `shutdown` (issue 12: the two taking batches at once deadlocked on a partition lock).
        self.stopping = False
        self.pump_task: asyncio.Task[None] | None = None
        self.pump_busy = False  # pump holds a batch (else it waits for one, and may be cancelled)
        self.flushed = 0
        self.exit_code = 0
        self.failed: SystemicFailure | None = None
        self._processor: BatchProcessor | None = None
        self._runner: ResilientRunner | None = None
        self._lock = threading.Lock()
        self.trainer = True  # owns partition 0 of the first event topic (see BatchProcessor.set_trainer)
        self.trainer_tp = (next(iter(settings.event_topics)), 0)

    # Shutdown: flush what is held, but give up waiting and retrying after a grace period.
    def begin_shutdown(self) -> None:
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.settings.shutdown_grace_s

    def should_stop(self) -> bool:
        return self._stop_deadline is not None and time.monotonic() > self._stop_deadline

    def remaining(self) -> float:
        """Seconds of the shutdown grace left (the whole grace before a shutdown began)."""
        if self._stop_deadline is None:
            return self.settings.shutdown_grace_s
        return max(self._stop_deadline - time.monotonic(), 0.0)

    async def stop_pump(self) -> bool:
        """Stop `pump`: it finishes the batch in hand (within the grace) and takes no other."""
        self.stopping = True
        task = self.pump_task
        if task is None or task.done():
            return True
        if not self.pump_busy:
            task.cancel()  # waiting for a batch, holding none: nothing is lost
        done, _ = await asyncio.wait({task}, timeout=self.remaining())
        if not done:
            task.cancel()
            return False
        return True

    async def shutdown(self) -> None:
        """SIGTERM: stop pump, then commit what is held (open batches too), all within the grace.

        Whatever is not committed by then is re-read from Postgres' offsets on restart, so
        giving up loses nothing; only waiting forever would be wrong.
        """
        self.begin_shutdown()
        self.batcher.seal()  # Faust's buffers still feed the agent: flush what is held, no more
        grace = self.settings.shutdown_grace_s
        held = self.batcher.pending
        if self.failed is not None:
            await self.stop_pump()
            log.info("shutdown after a systemic failure: nothing flushed; offsets stay where they were")
            return
        if not await self.stop_pump():
            log.warning(
                "shutdown: the batch in hand outlasted the %.0fs grace; %d held records are re-read "
                "from Postgres' offsets on restart",
                grace,
                held,
            )
            return
        try:
            await asyncio.wait_for(self._flush(), self.remaining())
        except TimeoutError:
            log.warning(
                "shutdown: grace of %.0fs passed; flushed %d held records, %d more are re-read from "
                "Postgres' offsets on restart",
                grace,
                self.flushed,
                held - self.flushed,
            )
            return
        log.info("shutdown: flushed %d held records", self.flushed)

    async def _flush(self) -> None:
        await self.drain()
        self.batcher.close_all()
        while (batch := self.batcher.take_ready()) is not None:
            try:
                if await self.run_batch(batch) is None:
                    return  # gave up (grace passed): the rest would too
                self.flushed += len(batch)
            finally:
                self.batcher.done(batch)
        await self.drain()

    def close(self, timeout: float) -> bool:
        """Release what the worker holds; False when a thread is still busy after `timeout`.

        Queued work is cancelled; a step already running (a learn step, a statement waiting on
        a lock) cannot be interrupted from outside its thread, and the interpreter would wait
        for it at exit, so the caller then exits without waiting (nothing uncommitted is lost).
        """
        deadline = time.monotonic() + timeout
        pools = (self.executor, self.committer)
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        busy = [t for pool in pools for t in _threads(pool, deadline) if t.is_alive()]
        try:
            self.dead_letters.close()
        except Exception as exc:
            log.warning("dead-letter producer did not close cleanly: %s", exc)
        if busy:
            return False
        if self._processor is not None:  # its threads have ended: nothing else touches it now
            self._processor.close()
        self.store.engine.dispose()
        return True

    @property
    def runner(self) -> ResilientRunner:
        with self._lock:
            if self._runner is None:
                encoder = build_encoder(self.settings)
                encoder.on_encoded = self.metrics.texts_encoded.inc
                model = build_interest_model(self.settings, encoder)
                # Loaded: what follows (restore, the catalog bootstrap) is encoding and reading,
                # which `istream_base_texts_encoded_total` shows as it goes.
                self.metrics.model_loaded.set(1)
                self._processor = BatchProcessor(
                    model,
                    self.store,
                    self.topic_kinds,
                    limits(self.settings),
                    base_model_name(self.settings),
                    dead_letter_sink=self.dead_letters,
                    on_weights_refused=self.metrics.refused_weights,
                )
                runner = ResilientRunner(
                    self._processor,
                    self.settings.retry_max_wait_s,
                    should_stop=self.should_stop,
                    on_retry=self.metrics.retries.inc,
                )
                self._processor.should_stop = self.should_stop
                runner._attempt(lambda: (self._processor.restore(), BatchOutcome())[1])  # type: ignore[union-attr]
                runner._attempt(lambda: (self.bootstrap_catalog(), BatchOutcome())[1])
                self._runner = runner
            return self._runner

    def preload_model(self) -> None:
        """Build the model on the model thread before Faust starts, not once it is ready.

        Importing torch, transformers' modeling code and river, loading the base, restoring
        and reading the catalog take several seconds; queued first, they overlap Faust's
        start and the group join (a worker's first batch 26 s -> 13.5 s after its start,
        docs/stream.md). A failure is left to the app's `warm_up` task, which asks for the
        model again and fails the worker as before.
        """
        try:
            _ = self.runner
        except Exception as exc:
            log.info("model not ready at start (%s); the first batch builds it", exc)

    def bootstrap_catalog(self) -> None:
        """Read the catalog topic to its current end before the first batch (BatchProcessor.
        bootstrap_catalog says why); bounded by ISTREAM_CATALOG_BOOTSTRAP_S."""
        s = self.settings
        if s.catalog_bootstrap_s <= 0 or self._processor is None:
            return
        started = time.monotonic()
        items, complete = read_catalog(self.bootstrap, s, limits(s), s.catalog_bootstrap_s)
        n = self._processor.bootstrap_catalog(items)
        took = time.monotonic() - started
        if complete:
            log.info("catalog: %d items from %s before the first event (%.1fs)", n, s.topic_items, took)
        else:
            log.warning(
                "catalog: read %d items of %s in %.0fs (ISTREAM_CATALOG_BOOTSTRAP_S) and went on; "
                "the rest arrive with the stream",
                n,
                s.topic_items,
                took,
            )

    def _run(self, batch: list[RawRecord]) -> BatchOutcome:
        runner = self.runner
        runner.processor.set_trainer(self.trainer)
        return runner.run(batch)

    def give_up_training(self) -> None:
        """Release the trainer lock now, not at our next batch: the new owner waits for it."""
        if self._processor is not None:
            asyncio.get_running_loop().run_in_executor(self.executor, self._processor.set_trainer, False)

    def _stage(self, batch: list[RawRecord]) -> StagedBatch | BatchOutcome:
        runner = self.runner
        runner.processor.set_trainer(self.trainer)
        return runner.stage(batch)

    async def _run_sync(
        self, batch: list[RawRecord], failed: SystemicFailure | None = None
    ) -> BatchOutcome | None:
        """Run a batch; after a systemic failure (`failed`: one already seen) try it again a
        bounded number of times, then stop the worker with a non-zero exit (None: not committed)."""
        loop = asyncio.get_running_loop()
        attempts = self.settings.systemic_max_attempts
        attempt = 0
        while True:
            if failed is not None:
                attempt += 1
                self._systemic(failed, attempt, len(batch))
                if attempt >= attempts:
                    self.fail(failed)
                    return None
                await self._pause(min(2.0**attempt, self.settings.retry_max_wait_s * 4))
                if self.stopping:
                    return None
            try:
                outcome = await loop.run_in_executor(self.executor, self._run, batch)
            except ShuttingDown:
                log.warning(
                    "shutting down with a batch of %d uncommitted; it is re-read on restart", len(batch)
                )
                return None
            except SystemicFailure as exc:
                failed = exc
                continue
            if attempt:
                log.info("batch of %d committed after %d systemic failures", len(batch), attempt)
                self.metrics.systemic_recovered()
            return outcome

    def _systemic(self, exc: SystemicFailure, attempt: int, n: int) -> None:
        self.metrics.systemic_failures.labels(exc.where.split(" (")[0]).inc()
        self.metrics.systemic_failing.set(1)
        self.metrics.set_systemic_error(str(exc))
        log.error(
            "systemic failure (attempt %d of %d) on a batch of %d valid records, left uncommitted: %s",
            attempt,
            self.settings.systemic_max_attempts,
            n,
            exc,
            exc_info=exc.cause if attempt == 1 else None,
            extra={"systemic": True, "attempt": attempt, "where": exc.where},
        )

    async def _pause(self, seconds: float) -> None:
        """Sleep between systemic attempts; a stop ends it early."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            await asyncio.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))

    def fail(self, exc: SystemicFailure) -> None:
        """Give up: stop consuming, commit nothing more, exit non-zero (an orchestrator restarts or pages)."""
        log.critical(
            "stopping after %d systemic failures in a row (ISTREAM_SYSTEMIC_MAX_ATTEMPTS); offsets stay "
            "uncommitted, exit code %d: %s",
            self.settings.systemic_max_attempts,
            EXIT_SYSTEMIC,
            exc,
        )
        self.failed = exc
        self.exit_code = EXIT_SYSTEMIC
        self.stopping = True
        self.batcher.seal()
        # The same path as SIGTERM (Faust's handler): a bounded shutdown that flushes nothing.
        os.kill(os.getpid(), signal.SIGTERM)

    async def run_batch(self, batch: list[RawRecord]) -> BatchOutcome | None:
        """One batch, start to end (after the one being committed, if any)."""
        await self.drain()
        outcome = await self._run_sync(batch)
        if outcome is not None:
            self._report(batch, outcome)
        return outcome

    async def pipeline(self, batch: list[RawRecord]) -> None:
        """Learn this batch while the previous one commits, then hand it to the committer.

        Batches of other partitions have other users (a user's events share a partition
        number), so learning one never depends on the other's commit; a batch of the same
        partitions waits for it. A failed commit is undone in memory and its batch processed
        again on the synchronous path (retries, poison isolation). `done` is called for
        every batch once it is committed or given up.
        """
        loop = asyncio.get_running_loop()
        if self._inflight is not None:
            busy = {r.partition for r in self._inflight[0]}
            if not busy.isdisjoint(r.partition for r in batch):
                await self.drain()
        try:
            staged = await loop.run_in_executor(self.executor, self._stage, batch)
        except ShuttingDown:
            log.warning("shutting down with a batch of %d uncommitted; it is re-read on restart", len(batch))
            await self.drain()
            self.batcher.done(batch)
            return
        except SystemicFailure as exc:
            await self.drain()
            try:
                outcome = await self._run_sync(batch, failed=exc)
                if outcome is not None:
                    self._report(batch, outcome)
            finally:
                self.batcher.done(batch)
            return
        except BaseException:
            await self.drain()
            self.batcher.done(batch)
            raise
        await self.drain()
        if isinstance(staged, BatchOutcome):  # staging failed and the synchronous path took it
            self._report(batch, staged)
            self.batcher.done(batch)
            return
        assert self._processor is not None
        fut = loop.run_in_executor(self.committer, self._processor.commit, staged)
        self._inflight = (batch, staged, fut)
        if not self.batcher.ready_batches:
            await self.drain()  # nothing to overlap with: account for it now

    async def drain(self) -> None:
        """Wait for the batch being committed, and account for it (or process it again)."""
        if self._inflight is None:
            return
        batch, staged, fut = self._inflight
        self._inflight = None
        loop = asyncio.get_running_loop()
        processor = self._processor
        assert processor is not None
        try:
            try:
                versions = await fut
            except Exception as exc:
                log.warning(
                    "commit of a batch of %d failed (%s: %s); processing it again",
                    len(batch),
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                )
                self.metrics.retries.inc()
                await loop.run_in_executor(self.executor, processor.abandon, staged)
                outcome = await self._run_sync(batch)
            else:
                outcome = await loop.run_in_executor(self.executor, processor.finish, staged, versions)
            if outcome is not None:
                self._report(batch, outcome)
        finally:
            self.batcher.done(batch)

    def _report(self, batch: list[RawRecord], outcome: BatchOutcome) -> None:
        self.metrics.observe(outcome, len(batch))
        parts = ",".join(str(p) for p in sorted({r.partition for r in batch}))
        log.info(
            "batch p%s: %d records, %d applied, %d duplicates, %d dead-lettered, %d users, %.3fs",
            parts,
            len(batch),
            outcome.applied,
            outcome.duplicates,
            len(outcome.dead_letters),
            outcome.users,
            outcome.seconds,
            extra={
                "partitions": parts,
                "records": len(batch),
                "applied": outcome.applied,
                "duplicates": outcome.duplicates,
                "dead_lettered": len(outcome.dead_letters),
                "users": outcome.users,
                "seconds": round(outcome.seconds, 4),
                "model_version": outcome.model_version,
            },
        )

    async def stored_offsets(self) -> Mapping[tuple[str, int], int]:
        """Postgres' offsets; waits for Postgres when it is down (seeking elsewhere could skip events)."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential_jitter(initial=0.2, max=self.settings.retry_max_wait_s),
            reraise=True,
        ):
            with attempt:
                return await asyncio.to_thread(self.store.stored_offsets)
        raise AssertionError("unreachable")

    def update_lag(self, consumer: Any, stored: Mapping[tuple[str, int], int]) -> None:
        for tp in consumer.assignment():
            try:
                high = consumer.highwater(tp)
            except Exception:  # not fetched yet
                continue
            if high is None:
                continue
            lag = max(int(high) - stored.get((tp.topic, tp.partition), 0), 0)
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)


def install_seek_to_stored(app: faust.App, rt: WorkerRuntime) -> None:
    """Make Faust's post-rebalance seek go to Postgres' offsets instead of Kafka's committed ones.

    Faust seeks every assigned partition to its committed offset once a rebalance
    completes (Consumer.perform_seek -> seek_to_committed). Kafka's committed offset
    can be ahead of Postgres (acked, then SIGKILL before the commit) or behind it;
    Postgres' is the one written with the vectors, so we seek there.
    """
    consumer = app.consumer
    if getattr(consumer, "_istream_seek_installed", False):
        return
    original = consumer.seek_to_committed
    ours = set(rt.topic_kinds)

    async def seek_to_stored() -> Mapping[Any, int]:
        committed = dict(await original())
        stored = await rt.stored_offsets()
        for tp in consumer.assignment():
            if tp.topic not in ours:
                continue
            target = stored.get((tp.topic, tp.partition), 0)
            if committed.get(tp) != target:
                log.info(
                    "seek %s[%d] to stored offset %d (kafka committed: %s)",
                    tp.topic,
                    tp.partition,
                    target,
                    committed.get(tp),
                )
            await consumer.seek(tp, target)
            committed[tp] = target
        return committed

    consumer.seek_to_committed = seek_to_stored
    consumer._istream_seek_installed = True


def shorten_fetch_wait(app: faust.App, max_wait_ms: int) -> None:
    """Cap how long a fetch waits at the broker for new records.

    Faust hard-codes 1,500 ms, and Tansu answers a waiting fetch at the end of the
    wait rather than when records arrive: measured, that alone put ~0.9 s between
    produce and read at 100 events/s. A short wait costs a few idle requests a second.
    """
    try:
        fetcher = app.consumer._thread._ensure_consumer()._fetcher
    except Exception as exc:
        log.warning("could not shorten the fetch wait (%s); freshness may suffer", exc)
        return
    fetcher._fetch_max_wait_ms = max_wait_ms


def create_app(settings: Settings, bootstrap: str, database_url: str) -> faust.App:
    app = faust.App(
        settings.group_id,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_rebalance_timeout=settings.session_timeout_s * 2,
        stream_buffer_maxsize=max(4 * settings.batch_size, 1000),
        # Faust would wait, unbounded, for every buffered record to pass the agent before our
        # flush; they are re-read from Postgres' offsets anyway, and the grace bounds the flush.
        stream_wait_empty=False,
    )
    rt = WorkerRuntime(settings, bootstrap, database_url)
    app.istream = rt  # type: ignore[attr-defined]
    records = app.topic(
        *settings.event_topics,
        settings.topic_items,
        key_serializer="raw",
        value_serializer="raw",
        allow_empty=True,
    )

    @app.agent(records, name="interest-records")
    async def intake(stream: Any) -> None:
        async for event in stream.events():
            # A record fetched before the last rebalance is re-read from Postgres' offsets;
            # taking it too could commit an offset past records not yet re-read.
            generation = getattr(event.message, "generation_id", None)
            if generation is not None and generation != app.consumer_generation_id:
                continue
            rec = _raw(event)
            rt.metrics.events_in.labels(rec.topic).inc()
            if rec.timestamp_ms:
                rt.metrics.fetch_delay.observe(max(time.time() - rec.timestamp_ms / 1000.0, 0.0))
            await rt.batcher.add(rec)

    @app.task
    async def pump() -> None:
        rt.pump_task = asyncio.current_task()
        while not rt.stopping:
            rt.pump_busy = False
            batch = await rt.batcher.next_batch()
            rt.pump_busy = True
            if settings.pipeline_commits:
                await rt.pipeline(batch)
                continue
            try:
                await rt.run_batch(batch)
            finally:
                rt.batcher.done(batch)
        rt.pump_busy = False

    @app.timer(interval=min(settings.batch_seconds / 10, 0.1))
    async def close_aged_batches() -> None:
        rt.batcher.close_expired()
        rt.metrics.pending.set(rt.batcher.pending)

    @app.timer(interval=settings.lag_interval_s)
    async def lag() -> None:
        try:
            stored = await asyncio.to_thread(rt.store.stored_offsets)
        except Exception as exc:  # Postgres away: the batch path reports it
            log.debug("lag not updated: %s", exc)
            return
        rt.update_lag(app.consumer, stored)

    if settings.retention_interval_s > 0:
        # Retention (docs/storage.md), off the training thread: pruning only deletes
        # superseded history rows, so it never waits on or blocks a batch.
        @app.timer(interval=settings.retention_interval_s)
        async def prune_history() -> None:
            store = build_store(settings, database_url)
            try:
                report = await asyncio.get_running_loop().run_in_executor(
                    None, store.prune, retention_policy(settings)
                )
            finally:
                store.engine.dispose()
            log.info(
                "retention: %d old versions, %d unused item vectors, the weights of %d superseded "
                "model versions pruned",
                report.user_versions_deleted,
                report.item_vectors_deleted,
                report.weights_dropped,
            )

    @app.task
    async def warm_up() -> None:
        # Load the base model and restore state before the first batch, off the loop.
        await asyncio.get_running_loop().run_in_executor(rt.executor, lambda: rt.runner)
        settle_heap()
        log.info("worker ready", extra={"group": settings.group_id})

    @app.on_partitions_revoked.connect
    async def on_revoked(app: faust.App, revoked: set[Any], **_: Any) -> None:
        dropped = rt.batcher.drop_all()
        log.info("partitions revoked: %d; dropped %d held records", len(revoked), dropped)

    @app.on_partitions_assigned.connect
    async def on_assigned(app: faust.App, assigned: set[Any], **_: Any) -> None:
        install_seek_to_stored(app, rt)
        shorten_fetch_wait(app, settings.fetch_max_wait_ms)
        dropped = rt.batcher.drop_all()
        rt.trainer = any((tp.topic, tp.partition) == rt.trainer_tp for tp in assigned)
        if not rt.trainer:
            rt.give_up_training()
        parts = sorted({tp.partition for tp in assigned})
        rt.metrics.partitions_assigned.set(len(assigned))
        log.info(
            "partitions assigned: %s; dropped %d held records; %s",
            parts,
            dropped,
            "trains shared parameters" if rt.trainer else "follows the registry",
        )

    @app.on_before_shutdown.connect
    async def flush(app: faust.App, **_: Any) -> None:
        # Faust calls this while our tasks (pump) still run; rt.shutdown stops pump first.
        await rt.shutdown()

    return app


def _threads(pool: ThreadPoolExecutor, deadline: float) -> list[threading.Thread]:
    """The pool's threads, each joined until `deadline` (the pool was shut down: idle ones end)."""
    threads = list(getattr(pool, "_threads", ()))
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.0))
    return threads


class VectorWidthMismatch(ValueError):
    """The database was migrated for vectors of another width than the model writes."""


def check_vector_width(settings: Settings, database_url: str) -> None:
    store = build_store(settings, database_url)
    try:
        stored, wanted = store.dim, published_dim(settings)
    finally:
        store.engine.dispose()
    if stored != wanted:
        raise VectorWidthMismatch(
            f"the database stores {stored}-d vectors but ISTREAM_MODEL={settings.model} writes {wanted}-d; "
            f"use a database migrated with ISTREAM_VECTOR_DIM={wanted}"
        )


def run_worker(settings: Settings, bootstrap: str, database_url: str) -> None:
    # A worker that starts while Postgres is down waits for it rather than exiting.
    for attempt in Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential_jitter(initial=0.5, max=settings.retry_max_wait_s),
        reraise=True,
    ):
        with attempt:
            # A fresh database gets the width this model writes; a migrated one keeps its own
            # and check_vector_width below refuses a mismatch with the command that fixes it.
            upgrade(database_url, vector_dim=vector_width(settings))
    check_vector_width(settings, database_url)
    serve(settings.metrics_port)
    app = create_app(settings, bootstrap, database_url)
    worker = faust.Worker(
        app,
        loglevel=settings.log_level,
        quiet=True,
        redirect_stdouts=False,
        logging_config=logging_config(settings.log_level, settings.log_format),
    )
    rt: WorkerRuntime = app.istream  # type: ignore[attr-defined]
    rt.executor.submit(rt.preload_model)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    else:  # pragma: no cover - execute_from_commandline always exits
        code = 0
    code = code or rt.exit_code
    # The flush gave up at the grace; what still runs in a thread gets a moment more.
    if not rt.close(timeout=min(max(rt.remaining(), 0.5), 2.0)):
        log.warning("a worker thread is still busy; exiting without waiting for it (its batch is re-read)")
        raise ExitNow(code)
    raise SystemExit(code)


class ExitNow(SystemExit):
    """Exit without joining threads (Python would wait for a busy one): the caller stops what
    it started (embedded servers) and then calls `exit_now`."""


def exit_now(code: int) -> NoReturn:
    logging.shutdown()
    os._exit(code)
