"""`istream demo`: the whole path on embedded servers, start to finish, in a few minutes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from sqlalchemy import text
from tqdm import tqdm

from storage.db import make_engine
from stream.broker import make_producer, topic_end_offsets
from stream.producer import EventProducer
from stream.servers import Servers
from stream.settings import Settings
from stream.sources import movielens_items, movielens_ratings, synthetic_log

DEFAULT_ML = Path("../shared/data/ml-100k")

# A few broken records, so the demo shows the dead-letter topic at work.
MALFORMED: list[tuple[str, bytes]] = [
    ("ratings", b'{"event_id": "bad-1", "user_id": "1", "item_id": "1", "rating": 9, "ts": 0}'),
    ("ratings", b'{"event_id": "bad-2", "item_id": "1", "rating": 3, "ts": 0}'),
    ("clicks", b"this is not json"),
    ("searches", b'{"event_id": "bad-4", "user_id": "1", "ts": "yesterday", "query": "x"}'),
]

TOP_SQL = """SELECT t.item_id, i.text AS title, round(t.score::numeric, 3) AS score
FROM user_top_items(:user_id, 5, true) t JOIN items i USING (item_id)
ORDER BY t.score DESC"""


def sample_records(data: Path | None, n_events: int) -> tuple[list[dict[str, Any]], str]:
    path = data if data is not None else DEFAULT_ML
    if (path / "u.data").is_file():
        return [*movielens_items(path), *movielens_ratings(path, n_events)], f"MovieLens 100K at {path}"
    if data is not None:
        raise click.ClickException(f"{data} is not a MovieLens 100K folder (no u.data)")
    return synthetic_log(n_users=50, n_events=n_events), "the built-in synthetic generator"


def run_demo(settings: Settings, data: Path | None, n_events: int, n_show: int) -> None:
    started = time.monotonic()
    records, source = sample_records(data, n_events)
    n_valid = sum(1 for r in records if r["type"] != "item")
    with tempfile.TemporaryDirectory(prefix="istream-demo-") as tmp:
        s = settings.model_copy(update={"kafka_bootstrap": None, "database_url": None, "data_dir": Path(tmp)})
        click.echo("starting embedded Kafka-compatible broker (Tansu) and PostgreSQL 18 + pgvector…")
        with Servers(s) as ep:
            click.echo(f"  kafka    {ep.bootstrap}\n  postgres {ep.database_url}")
            click.echo(f"producing {len(records)} records from {source} (+{len(MALFORMED)} malformed)…")
            producer = make_producer(ep.bootstrap)
            EventProducer(producer, s).send_all(records, progress=True, total=len(records))
            topics = {"ratings": s.topic_ratings, "clicks": s.topic_clicks, "searches": s.topic_searches}
            for topic, raw in MALFORMED:
                producer.send(topics[topic], key=b"1", value=raw)
            producer.flush()
            producer.close()
            log_path = Path(tmp) / "worker.log"
            click.echo(f"starting `istream worker` (log: {log_path})…")
            worker = start_worker(ep.bootstrap, ep.database_url, log_path)
            try:
                wait_until_consumed(ep, s, worker, n_valid, len(MALFORMED), log_path)
            finally:
                stop_worker(worker)
            show_users(ep.database_url, n_show)
    click.echo(f"demo finished in {time.monotonic() - started:.0f}s; servers shut down.")


def start_worker(
    bootstrap: str, database_url: str, log_path: Path, cwd: Path | None = None, **env: str
) -> subprocess.Popen[bytes]:
    """`istream worker` as a child process against the given servers, logging to `log_path`."""
    full_env = {
        **os.environ,
        "ISTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "ISTREAM_DATABASE_URL": database_url,
        **env,
    }
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "worker"],
            cwd=cwd,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_worker(worker: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Signal the worker (SIGTERM: it commits what it holds) and wait; kill it past `timeout`."""
    if worker.poll() is None:
        worker.send_signal(sig)
        try:
            worker.wait(timeout)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return worker.returncode


def wait_until_consumed(
    ep: Any,
    s: Settings,
    worker: subprocess.Popen[bytes],
    n_valid: int,
    n_invalid: int,
    log_path: Path,
    timeout: float = 240.0,
) -> None:
    engine = make_engine(ep.database_url)
    deadline = time.monotonic() + timeout
    applied = dead = 0
    with tqdm(total=n_valid + n_invalid, desc="applied", unit="ev") as bar:
        while True:
            with engine.connect() as conn:
                applied = int(
                    conn.execute(
                        text("SELECT coalesce(sum(n_events), 0) FROM user_interests_current")
                    ).scalar_one()
                )
            dead = topic_end_offsets(ep.bootstrap, s.topic_dead_letter)
            bar.update(applied + dead - bar.n)
            if applied >= n_valid and dead >= n_invalid:
                break
            if worker.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise click.ClickException(f"the worker exited with {worker.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise click.ClickException(f"timed out: {applied}/{n_valid} applied, {dead} dead letters")
            time.sleep(0.5)
    engine.dispose()
    click.echo(f"applied {applied} valid events; {dead} malformed records went to {s.topic_dead_letter}")


def show_users(database_url: str, n_show: int) -> None:
    engine = make_engine(database_url)
    with engine.connect() as conn:
        users = conn.execute(
            text(
                "SELECT user_id, version, n_events, model_version FROM user_interests_current "
                "ORDER BY n_events DESC, user_id LIMIT :n"
            ),
            {"n": n_show},
        ).all()
        for user in users:
            click.echo(
                f"\nuser {user.user_id}: version {user.version}, {user.n_events} events, "
                f"model {user.model_version}; top unseen items:"
            )
            for row in conn.execute(text(TOP_SQL), {"user_id": user.user_id}):
                click.echo(f"  {row.score:>6}  {row.title}")
    engine.dispose()
    example = TOP_SQL.replace(":user_id", f"'{users[0].user_id}'" if users else "'1'")
    click.echo("\nthe same by hand, in psql against ISTREAM_DATABASE_URL:\n")
    click.echo("  SELECT user_id, version, n_events, vector FROM user_interests_current LIMIT 5;")
    click.echo("  " + example.replace("\n", "\n  ") + ";")
    click.echo("  SELECT * FROM user_vector_as_of('1', now() - interval '1 minute');\n")
