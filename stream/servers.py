"""Kafka and Postgres as configured, or the embedded ones when a setting is unset."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass

from storage.db import EmbeddedPostgres, upgrade
from stream.broker import EmbeddedBroker, ensure_topics
from stream.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Endpoints:
    bootstrap: str
    database_url: str
    embedded_broker: bool
    embedded_postgres: bool


class Servers:
    """Context manager: yields endpoints, starting embedded servers for unset settings."""

    def __init__(self, settings: Settings, *, kafka: bool = True, postgres: bool = True) -> None:
        self.settings = settings
        self.kafka = kafka
        self.postgres = postgres
        self._stack = ExitStack()
        self.broker: EmbeddedBroker | None = None
        self.pg: EmbeddedPostgres | None = None

    def __enter__(self) -> Endpoints:
        s = self.settings
        try:
            bootstrap = s.kafka_bootstrap or ""
            if self.kafka and not bootstrap:
                self.broker = self._stack.enter_context(EmbeddedBroker(log_dir=s.data_dir))
                bootstrap = self.broker.bootstrap
                log.info("embedded Kafka-compatible broker (Tansu) on %s", bootstrap)
            if self.kafka:
                ensure_topics(bootstrap, [*s.event_topics, s.topic_dead_letter], s.partitions)
                ensure_topics(bootstrap, [s.topic_items], s.partitions, compacted=[s.topic_items])
            url = s.database_url or ""
            if self.postgres and not url:
                self.pg = self._stack.enter_context(EmbeddedPostgres(s.data_dir / "postgres"))
                url = self.pg.url
                log.info("embedded PostgreSQL at %s", url)
            if self.postgres:
                # A fresh database takes the width of what the configured model writes (unless
                # ISTREAM_VECTOR_DIM says otherwise); an existing one keeps its own.
                from stream.runtime import vector_width

                upgrade(url, vector_dim=vector_width(s), vector_backend=s.vector_backend)
        except BaseException:
            self._stack.close()
            raise
        return Endpoints(bootstrap, url, self.broker is not None, self.pg is not None)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
