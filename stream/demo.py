"""`istream demo`: the whole path on embedded servers, then one user's interests moving live.

Named phases, each with its own progress: starting servers, producing the sample,
then what the worker (a child process) reports on its Prometheus endpoint — loading
the base model, joining the consumer group, encoding the catalog, applying events.
Then one user's top 5, a burst of that user's new events in one genre produced
live, the top 5 again once the worker stored them, and the SQL that shows the two
versions side by side.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
from sqlalchemy import Engine, text

from models.catalog import item_text
from storage.db import make_engine
from stream.broker import free_port, make_producer, topic_end_offsets
from stream.producer import EventProducer
from stream.progress import progress
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

# Two stored versions of one user, each scored against its own model version's item
# vectors, skipping what the user had seen by then: the top 5 before and after, side by side.
VERSIONS_SQL = """SELECT r.rank, v.version, v.model_version, i.text AS title,
       round(r.score::numeric, 3) AS score
FROM user_interest_vectors v
CROSS JOIN LATERAL (
    SELECT iv.item_id, -(iv.vector <#> v.vector) AS score,
           row_number() OVER (ORDER BY iv.vector <#> v.vector) AS rank
    FROM item_vectors iv
    WHERE iv.model_version = v.model_version
      AND NOT EXISTS (SELECT 1 FROM applied_events e WHERE e.user_id = v.user_id
                      AND e.item_id = iv.item_id AND e.ts <= v.last_event_ts)
    ORDER BY iv.vector <#> v.vector LIMIT 5
) r
JOIN items i ON i.item_id = r.item_id
WHERE v.user_id = :user_id AND v.version IN (:before, :after)
ORDER BY r.rank, v.version"""

BURST = 20  # new events of the shown user, all in one genre
MIN_HISTORY = 5  # the shown user has at least this many events before the burst
# Genres that read as a clear change of taste, in the order the demo prefers them.
SHIFT_GENRES = ("Horror", "Children's", "Western", "Documentary", "Film-Noir", "Musical", "War", "Sci-Fi")


def sample_records(data: Path | None, n_events: int) -> tuple[list[dict[str, Any]], str]:
    path = data if data is not None else DEFAULT_ML
    if (path / "u.data").is_file():
        return [*movielens_items(path), *movielens_ratings(path, n_events)], f"MovieLens 100K at {path}"
    if data is not None:
        raise click.ClickException(f"{data} is not a MovieLens 100K folder (no u.data)")
    # Three bursts' worth of items per topic and ~50 events a user: the burst then takes a third
    # of a topic the user has not had, and the rest of it can be seen to rise.
    log = synthetic_log(n_users=max(50, n_events // 50), n_events=n_events, items_per_topic=3 * BURST)
    return log, "the built-in synthetic generator"


def genres_of(record: dict[str, Any]) -> list[str]:
    """MovieLens genres (u.item), or the synthetic generator's topic: the genre-like attribute."""
    attrs = record.get("attrs") or {}
    if attrs.get("genres"):
        return list(attrs["genres"])
    return [attrs["topic"]] if attrs.get("topic") else []


def phase(name: str) -> None:
    click.echo(f"\n== {name}")


def run_demo(settings: Settings, data: Path | None, n_events: int, n_show: int) -> None:
    started = time.monotonic()
    records, source = sample_records(data, n_events)
    catalog = [r for r in records if r["type"] == "item"]
    events = [r for r in records if r["type"] != "item"]
    with tempfile.TemporaryDirectory(prefix="istream-demo-") as tmp:
        s = settings.model_copy(update={"kafka_bootstrap": None, "database_url": None, "data_dir": Path(tmp)})
        phase("starting servers: embedded Kafka-compatible broker (Tansu), PostgreSQL 18 + pgvector")
        t = time.monotonic()
        with Servers(s) as ep:
            click.echo(f"  kafka    {ep.bootstrap}\n  postgres {ep.database_url}")
            click.echo(f"  ready in {time.monotonic() - t:.1f}s (schema migrated for {s.model}'s vectors)")
            phase(f"producing {len(records):,} records from {source} (+{len(MALFORMED)} malformed)")
            producer = make_producer(ep.bootstrap)
            EventProducer(producer, s).send_all(records, progress=True, total=len(records))
            topics = {"ratings": s.topic_ratings, "clicks": s.topic_clicks, "searches": s.topic_searches}
            for topic, raw in MALFORMED:
                producer.send(topics[topic], key=b"1", value=raw)
            producer.flush()
            log_path = Path(tmp) / "worker.log"
            port = free_port()
            phase(f"starting `istream worker` (model {s.model}; log {log_path}; metrics :{port})")
            worker = start_worker(ep.bootstrap, ep.database_url, log_path, ISTREAM_METRICS_PORT=str(port))
            engine = make_engine(ep.database_url)
            try:
                watch = WorkerWatch(worker, port, log_path)
                texts = {item_text(r.get("text") or "", r.get("attrs") or {}) for r in catalog}
                follow_startup(watch, len(catalog), len(texts), len(events))
                dead = topic_end_offsets(ep.bootstrap, s.topic_dead_letter)
                click.echo(f"  {len(MALFORMED)} malformed records -> {s.topic_dead_letter} ({dead} there)")
                show_users(engine, n_show)
                show_shift(engine, producer, s, watch, catalog, events)
            finally:
                producer.close()
                stop_worker(worker)
                engine.dispose()
    click.echo(f"\ndemo finished in {time.monotonic() - started:.0f}s; servers shut down.")


def start_worker(
    bootstrap: str,
    database_url: str,
    log_path: Path,
    cwd: Path | None = None,
    base_env: Mapping[str, str] | None = None,
    **env: str,
) -> subprocess.Popen[bytes]:
    """`istream worker` as a child process against the given servers, logging to `log_path`;
    its environment is `base_env` (default: this process's) with `env` on top."""
    full_env = {
        **(os.environ if base_env is None else base_env),
        "ISTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "ISTREAM_DATABASE_URL": database_url,
        **env,
    }
    return start_cli(["worker"], log_path, full_env, cwd)


def start_cli(
    args: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """`istream ARGS` as a child process with environment `env`, its output appended to `log_path`
    (a pipe that nobody reads would fill and stall it)."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "stream.cli", *args],
            cwd=cwd,
            env=dict(env),
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


class WorkerWatch:
    """What the worker says about itself on /metrics (its start-up phases, events applied)."""

    def __init__(self, worker: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.worker = worker
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.log_path = log_path

    def sample(self) -> dict[str, float]:
        """Metric sample name -> value (labels summed); empty until the endpoint is up."""
        from prometheus_client.parser import text_string_to_metric_families

        self.check_alive()
        try:
            with urllib.request.urlopen(self.url, timeout=2) as resp:
                body = resp.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
        return out

    def check_alive(self) -> None:
        if self.worker.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise click.ClickException(f"the worker exited with {self.worker.returncode}:\n{tail}")

    def wait(
        self,
        name: str,
        done: Callable[[dict[str, float]], float],
        total: float | None,
        unit: str,
        timeout: float = 240.0,
    ) -> None:
        """One phase: poll until done(sample) reaches total (or is truthy when total is None)."""
        phase(name)
        started = time.monotonic()
        deadline = started + timeout
        if total is None:  # a step without a count: say it is still going, every few seconds
            said = started
            while not done(self.sample()):
                if time.monotonic() > deadline:
                    raise click.ClickException(f"timed out: {name} (after {timeout:.0f}s)")
                if time.monotonic() - said >= 3.0:
                    said = time.monotonic()
                    click.echo(f"  … {said - started:.0f}s")
                time.sleep(0.25)
            click.echo(f"  done in {time.monotonic() - started:.1f}s")
            return
        with progress(total, "  " + name.split(" ")[0], unit=unit, every_s=2.0) as bar:
            while True:
                value = done(self.sample())
                if value > bar.n:
                    bar.update(value - bar.n)
                if (value >= total) if total is not None else value:
                    break
                if time.monotonic() > deadline:
                    raise click.ClickException(f"timed out: {name} ({value:g} after {timeout:.0f}s)")
                time.sleep(0.25)
        click.echo(f"  done in {time.monotonic() - started:.1f}s")


def follow_startup(watch: WorkerWatch, n_items: int, n_texts: int, n_events: int) -> None:
    watch.wait("loading the base model", lambda m: m.get("istream_model_loaded", 0.0), None, "")
    watch.wait("joining the consumer group", lambda m: m.get("istream_partitions_assigned", 0.0), None, "")
    # Catalog partitions are encoded while other partitions' events already apply; once every
    # event is applied the catalog is surely encoded (a text is encoded once however many items share it).
    watch.wait(
        f"encoding {n_items:,} catalog items",
        lambda m: (
            n_texts
            if m.get("istream_events_applied_total", 0.0) >= n_events
            else m.get("istream_base_texts_encoded_total", 0.0)
        ),
        n_texts,
        "text",
    )
    watch.wait(
        f"applying {n_events:,} events",
        lambda m: m.get("istream_events_applied_total", 0.0),
        n_events,
        "ev",
    )


def show_users(engine: Engine, n_show: int) -> None:
    phase(f"the {n_show} most active users' top unseen items")
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


def _current(engine: Engine, user: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT version, model_version, n_events, extract(epoch FROM last_event_ts)::float8 AS ts "
                "FROM user_interests_current WHERE user_id = :u"
            ),
            {"u": user},
        ).one()


def _top(engine: Engine, user: str) -> list[tuple[str, str, float]]:
    with engine.connect() as conn:
        return [(r.item_id, r.title, float(r.score)) for r in conn.execute(text(TOP_SQL), {"user_id": user})]


def pick_shift(
    user: str, catalog: list[dict[str, Any]], events: list[dict[str, Any]]
) -> tuple[str, list[str]]:
    """A genre the user has shown little taste for, and its most popular items they have not seen."""
    genres = {r["item_id"]: genres_of(r) for r in catalog}
    seen = {e.get("item_id") for e in events if e["user_id"] == user}
    had = Counter(g for i in seen for g in genres.get(i or "", []))
    popular = Counter(e.get("item_id") for e in events)
    candidates = [g for g in SHIFT_GENRES if any(g in gs for gs in genres.values())]
    if not candidates:  # synthetic topics, or another catalog: any genre-like value
        candidates = sorted({g for gs in genres.values() for g in gs})
    genre = min(candidates, key=lambda g: (had[g], candidates.index(g)))
    pool = [i for i, gs in genres.items() if genre in gs and i not in seen]
    pool.sort(key=lambda i: (-popular[i], i))
    return genre, pool[:BURST]


def show_shift(
    engine: Engine,
    producer: Any,
    s: Settings,
    watch: WorkerWatch,
    catalog: list[dict[str, Any]],
    events: list[dict[str, Any]],
) -> None:
    genres = {r["item_id"]: genres_of(r) for r in catalog}
    with engine.connect() as conn:
        # A user with a short history: the burst is then a real change of their recent taste.
        user = conn.execute(
            text(
                "SELECT user_id FROM user_interests_current ORDER BY n_events < :n, n_events, user_id LIMIT 1"
            ),
            {"n": MIN_HISTORY},
        ).scalar_one()
    genre, burst_items = pick_shift(user, catalog, events)
    before = _current(engine, user)
    top_before = _top(engine, user)
    phase(f"interests moving: user {user}")
    _print_top("now", before, top_before, genres, genre)

    click.echo(f"\n  producing {len(burst_items)} new 5-star ratings of {genre} items by user {user}…")
    burst = burst_records(user, burst_items, before.ts)
    sent_at = time.monotonic()
    EventProducer(producer, s).send_all(burst)
    target = before.n_events + len(burst)
    deadline = time.monotonic() + 60
    while _current(engine, user).n_events < target:
        watch.check_alive()
        if time.monotonic() > deadline:
            raise click.ClickException(f"timed out waiting for user {user}'s burst to be applied")
        time.sleep(0.2)
    after = _current(engine, user)
    click.echo(f"  stored {time.monotonic() - sent_at:.1f}s after producing")
    top_after = _top(engine, user)
    _print_top("a few seconds later", after, top_after, genres, genre)
    moved = len({i for i, _, _ in top_after} - {i for i, _, _ in top_before})
    share = [sum(genre in genres.get(i, []) for i, _, _ in t) for t in (top_before, top_after)]
    click.echo(f"\n  {moved} of 5 items changed; {genre} in the top 5: {share[0]} before, {share[1]} after")
    others = {i for i, gs in genres.items() if genre in gs} - set(burst_items)
    ranks = [median_rank(engine, user, v.version, others) for v in (before, after)]
    click.echo(
        f"  the other {len(others)} {genre} items' median rank among all {len(genres)}: "
        f"{ranks[0]:.0f} before, {ranks[1]:.0f} after"
    )

    phase("the two versions side by side, in SQL (psql against ISTREAM_DATABASE_URL)")
    sql = VERSIONS_SQL.replace(":user_id", f"'{user}'").replace(":before", str(before.version))
    sql = sql.replace(":after", str(after.version))
    click.echo("\n  " + sql.replace("\n", "\n  ") + ";\n")
    with engine.connect() as conn:
        rows = conn.execute(
            text(VERSIONS_SQL), {"user_id": user, "before": before.version, "after": after.version}
        ).all()
    by_rank: dict[int, dict[int, str]] = {}
    for r in rows:
        by_rank.setdefault(int(r.rank), {})[int(r.version)] = f"{r.title} ({r.score})"
    left, right = f"version {before.version}", f"version {after.version}"
    click.echo(f"  {'rank':<5} {left:<48} {right}")
    for rank in sorted(by_rank):
        cells = by_rank[rank]
        a, b = cells.get(before.version, ""), cells.get(after.version, "")
        click.echo(f"  {rank:<5} {a[:48]:<48} {b[:48]}")
    click.echo(
        f"\n  SELECT * FROM user_vector_as_of('{user}', now() - interval '1 minute');"
        "   -- any past moment, by commit time"
    )


def burst_records(user: str, items: Sequence[str], after_ts: float) -> list[dict[str, Any]]:
    """The shown user's 5-star ratings of `items`, a minute apart after their last event (`after_ts`, s)."""
    return [
        {
            "type": "rating",
            "event_id": f"demo-burst-{user}-{n}",
            "user_id": user,
            "item_id": item,
            "rating": 5.0,
            "ts": int((after_ts + 60 * (n + 1)) * 1000),
        }
        for n, item in enumerate(items)
    ]


def median_rank_of(scores: np.ndarray, ids: Sequence[str], items: Collection[str]) -> float:
    """Median rank (1 = best) of `items` among all `ids` by `scores`; NaN when none is there."""
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(1, len(ids) + 1)
    mine = [rank[n] for n, i in enumerate(ids) if i in items]
    return float(np.median(mine)) if mine else float("nan")


def median_rank(engine: Engine, user: str, version: int, items: set[str]) -> float:
    """Median rank (1 = best) of `items` under one stored version of the user, against its model's items."""
    with engine.connect() as conn:
        vec, model_version = conn.execute(
            text(
                "SELECT vector::real[], model_version FROM user_interest_vectors "
                "WHERE user_id = :u AND version = :v"
            ),
            {"u": user, "v": version},
        ).one()
        rows = conn.execute(
            text("SELECT item_id, vector::real[] FROM item_vectors WHERE model_version = :m"),
            {"m": model_version},
        ).all()
    scores = np.asarray([r[1] for r in rows], dtype=np.float64) @ np.asarray(vec, dtype=np.float64)
    return median_rank_of(scores, [r[0] for r in rows], items)


def _print_top(
    when: str, cur: Any, top: list[tuple[str, str, float]], genres: dict[str, list[str]], genre: str
) -> None:
    click.echo(f"\n  {when}: version {cur.version}, {cur.n_events} events, model version {cur.model_version}")
    for item, title, score in top:
        mark = "*" if genre in genres.get(item, []) else " "
        click.echo(f"   {mark} {score:>7.3f}  {title[:52]:<52} {', '.join(genres.get(item, []))}")
