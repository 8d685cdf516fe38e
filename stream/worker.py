"""The Faust worker: thin agents that batch raw records and hand them to `BatchProcessor`."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust

from storage.db import upgrade
from storage.encodings import model_encoder, persist_encodings, restore_encodings
from stream.explain import latest_weights
from stream.processor import BatchOutcome, BatchProcessor, RawRecord, encode_dead_letter
from stream.runtime import base_model_name, build_interest_model, build_store, limits
from stream.settings import Settings

log = logging.getLogger("istream.worker")


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
        broker_commit_every=settings.batch_size,
        stream_buffer_maxsize=max(4 * settings.batch_size, 1000),
    )
    topic_kinds = {**settings.event_topics, settings.topic_items: "item"}
    events_topic = app.topic(
        *settings.event_topics, key_serializer="raw", value_serializer="raw", allow_empty=True
    )
    items_topic = app.topic(
        settings.topic_items, key_serializer="raw", value_serializer="raw", allow_empty=True
    )
    dead_letter_topic = app.topic(settings.topic_dead_letter, key_serializer="raw", value_serializer="raw")
    # One thread runs every model step and SQL write, in arrival order: the model
    # is not thread-safe, and the event loop stays free for heartbeats.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="istream-train")
    state: dict[str, BatchProcessor] = {}

    def processor() -> BatchProcessor:
        if "p" not in state:
            model = build_interest_model(settings)
            store = build_store(settings, database_url)
            state["p"] = BatchProcessor(
                model, store, topic_kinds, limits(settings), base_model_name(settings)
            )
            encoder = model_encoder(model)
            if encoder is not None:
                log.info("restored %d base encodings", restore_encodings(store.engine, encoder))
            catalog = store.load_catalog()
            if catalog:
                state["p"].model.upsert_items(catalog)
                log.info("restored %d catalog items from Postgres", len(catalog))
                if encoder is not None:
                    persist_encodings(store.engine, encoder)
            saved = latest_weights(store.engine, getattr(model, "spec", settings.model))
            if saved is not None and hasattr(model, "load_weights"):
                model.load_weights(saved[1])  # continue training where the last worker stopped
                log.info("restored the weights of %s", saved[0])
            state["p"].ensure_published()
        return state["p"]

    async def run_batch(events: list[Any]) -> BatchOutcome:
        records = [_raw(e) for e in events]
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(executor, lambda: processor().process(records))
        encoder = model_encoder(processor().model) if outcome.items else None
        if encoder is not None:  # new catalog texts: keep their encodings across restarts
            await loop.run_in_executor(executor, persist_encodings, processor().store.engine, encoder)
        for entry in outcome.dead_letters:
            await dead_letter_topic.send(
                key=(entry.get("key") or "").encode("utf-8") or None,
                value=encode_dead_letter(entry),
            )
        log.info(
            "batch: %d records, %d applied, %d duplicates, %d invalid, %d users, %d items, %.3fs",
            len(records),
            outcome.applied,
            outcome.duplicates,
            len(outcome.dead_letters),
            outcome.users,
            outcome.items,
            outcome.seconds,
        )
        return outcome

    @app.agent(events_topic, name="interest-events")
    async def on_events(stream: Any) -> None:
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_seconds):
            await run_batch(list(batch))

    @app.agent(items_topic, name="interest-items")
    async def on_items(stream: Any) -> None:
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_seconds):
            await run_batch(list(batch))

    @app.task
    async def warm_up() -> None:
        # Load the base model before the first batch so the first batch is not slow.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, processor)
        log.info("worker ready")

    return app


def run_worker(settings: Settings, bootstrap: str, database_url: str) -> None:
    upgrade(database_url)
    app = create_app(settings, bootstrap, database_url)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
