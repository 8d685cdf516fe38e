"""What the live system served is what the backtest measures (issue 11).

A prefix of MovieLens 100K goes through `istream replay` into a running `istream worker`
(real embedded broker and Postgres), once as fast as possible (a backlog) and once paced
(`--speed`); `istream evaluate` then ranks every applied positive against the vector the
worker stored just before it, and its NDCG@10 and Recall@20 are compared with
`istream backtest` over the same events with the same settings.

The prefix is ISTREAM_TEST_LIVE_EVENTS (default 20,000, as the issue asks). Shorter
prefixes are too noisy for a 10% band with the learned default: over the first 5,000
events, where the worker's batches happened to end alone moved the backtest's own NDCG@10
by 12% (README "Live vs backtest"). The untrained `decayed_mean` learns nothing, so any gap
there is the evaluate or replay path's fault; the learned default's parity also needs the
worker to learn per event what the backtest does (the training budget), and users without
a stored vector to be ranked by the prior the worker's version serves them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from storage.db import make_engine
from stream.broker import EmbeddedBroker, ensure_topics
from stream.runtime import published_dim
from stream.settings import DEFAULT_MODEL, Settings
from tests.helpers import THOROUGH, run_cli, start_cli, start_worker, stop_worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The learned default over 20,000 events; the untrained control, which has no trajectory to
# vary, over 5,000 (its figures check the evaluate and replay path, and it keeps the suite short).
_LIVE_EVENTS = os.environ.get("ISTREAM_TEST_LIVE_EVENTS")
N_EVENTS = {m: int(_LIVE_EVENTS or n) for m, n in (("decayed_mean", 5000), (DEFAULT_MODEL, 20000))}
TOLERANCE = 0.10
METRICS = ("ndcg@10", "recall@20")
# The same settings on both sides: the worker's batch is the backtest's micro-batch (100
# events), on one partition, so under backlog the worker's batches are the backtest's. A
# user's vector is stored once per batch, so a coarser batch (the default 2,000 per
# partition) scores more positives against an older vector: ISTREAM_TEST_LIVE_BATCH.
BATCH = int(os.environ.get("ISTREAM_TEST_LIVE_BATCH", str(Settings().backtest_batch_size)))
PARTITIONS = int(os.environ.get("ISTREAM_TEST_LIVE_PARTITIONS", "1"))
BATCH_SECONDS = 0.5
# The learned default both ways, as the issue asks. The untrained control (ISTREAM_TEST_THOROUGH=1)
# runs once, under backlog: it has no trajectory that pacing could change, and the evaluate path
# it checks is checked rank for rank by test_evaluate_exact.py.
# Paced first: its replay leaves room for the backtest running beside it (`Backtest`).
CASES = [("paced", DEFAULT_MODEL), ("backlog", DEFAULT_MODEL)]
if THOROUGH:
    CASES.insert(0, ("backlog", "decayed_mean"))
# Under backlog a batch must close on size, as the backtest's micro-batches do. The replay
# produces while the worker consumes: on a loaded machine the worker caught up with it now and
# then, and a 0.5 s age closed 3 of 218 batches early (82, 59, 59 records). Every boundary after
# the first such batch differed from the backtest's, and the run ended 0.88x of it.
BACKLOG_BATCH_SECONDS = 30.0


def _paced_speed(ml100k: Path, n: int) -> float:
    """Event-time seconds per wall second that puts about BATCH events in each BATCH_SECONDS."""
    from stream.sources import movielens_ratings

    ratings = movielens_ratings(ml100k, n)
    span_s = (ratings[-1]["ts"] - ratings[0]["ts"]) / 1000
    return span_s * BATCH / (n * BATCH_SECONDS)


def _applied(db_url: str) -> int:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM applied_events")).scalar_one())
    except Exception:  # the worker has not created the schema yet
        return 0
    finally:
        engine.dispose()


def tolerance(metric: str, value: float, n: int, model: str) -> float:
    """The issue's 10% of the backtest's figure for the learned default; for the untrained
    control (a check of the evaluate path itself), 10% or two standard errors of the mean,
    whichever is wider.

    Every metric here is a mean of per-positive values in [0, 1], whose variance is at most
    m(1 - m) (the binomial bound, exact for recall). The untrained model's figures on 5,000
    events rest on a few dozen hits of 2,744: NDCG@10 0.0027 live vs 0.0024 in the backtest
    (13%) is noise, and under load the worker's batches close on time, not size, so its
    vectors differ by a few events from the backtest's.
    """
    band = TOLERANCE * value
    if model == "decayed_mean":
        band = max(band, 2 * math.sqrt(value * (1 - value) / max(n, 1)))
    return band


def _seed_encodings(db_url: str, cache_dir: Path) -> int:
    """Give a fresh database the catalog's base encodings the backtests computed.

    The worker restores them from `base_encodings` as after a restart, instead of
    encoding 1,682 titles again in each of the four runs (minutes on a busy 2-core box).
    """
    import numpy as np
    from sqlalchemy.dialects.postgresql import insert

    from storage.schema import BaseEncoding

    engine = make_engine(db_url)
    n = 0
    try:
        for file in cache_dir.glob("*.npz"):
            with np.load(file) as data:
                rows = [
                    {"base_version": file.stem, "text_sha1": str(k), "vector": np.asarray(v, np.float32)}
                    for k, v in zip(data["keys"].tolist(), data["vectors"], strict=True)
                ]
            with engine.begin() as conn:
                for i in range(0, len(rows), 500):
                    conn.execute(insert(BaseEncoding).values(rows[i : i + 500]).on_conflict_do_nothing())
            n += len(rows)
    finally:
        engine.dispose()
    return n


def _texts(ml100k: Path) -> int:
    """Distinct item texts of the catalog (1,664: some of the 1,682 films share a title and genres)."""
    from models.catalog import item_text
    from stream.sources import movielens_items

    return len({item_text(r["text"], r["attrs"]) for r in movielens_items(ml100k)})


def _totals(report: Path, model: str) -> dict[str, float]:
    doc = json.loads((report / "result.json").read_text())
    return doc["totals"]["warm"][model]


class Backtest:
    """`istream backtest` over the prefix, running beside the replays.

    A paced replay leaves the CPU mostly idle for its 100 s, and the backtest (tens of seconds
    on 2 loaded cores) needs nothing from it: running the two side by side keeps the suite
    short. The catalog's encodings come first, in the foreground (a 1-event backtest), since
    the workers are seeded with them.
    """

    def __init__(self, ml100k: Path, model: str, root: Path) -> None:
        self.model = model
        self.report = root / model
        self.encodings = root / "data" / "encodings"
        env = {"ISTREAM_DATA_DIR": str(root / "data"), "ISTREAM_DEVICE": "cpu"}
        args = ["backtest", "--movielens", str(ml100k), "--models", model, "--quiet"]
        warm = run_cli(*args, "--limit", "1", "--out", str(root / "encode"), env=env, timeout=600)
        assert warm.returncode == 0, warm.stderr
        self.started = time.monotonic()
        self.timeout = 600 + N_EVENTS[model] / 100
        self._log = root / "backtest.log"
        self._proc = start_cli(
            *args, "--limit", str(N_EVENTS[model]), "--out", str(self.report), env=env, log=self._log
        )
        self._done = False

    def result(self) -> Path:
        """The report folder, once the run has ended (a deadline for a hang, not a speed target)."""
        if not self._done:
            rc = self._proc.wait(timeout=self.timeout)
            assert rc == 0, self._log.read_text(errors="replace")[-4000:]
            print(f"backtest {self.model}: {time.monotonic() - self.started:.1f}s, beside the replays")
            self._done = True
        return self.report

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


@pytest.fixture(scope="module")
def backtests(ml100k: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Backtest]]:
    """One backtest per model over the prefix, shared by both replay modes."""
    root = tmp_path_factory.mktemp("bt")
    runs: dict[str, Backtest] = {}
    try:
        for model in dict.fromkeys(m for _, m in CASES):
            runs[model] = Backtest(ml100k, model, root / model)
        yield runs
    finally:
        for run in runs.values():
            run.stop()


@pytest.mark.parametrize(("mode", "model"), CASES)
def test_live_matches_backtest(
    model: str,
    mode: str,
    ml100k: Path,
    broker: EmbeddedBroker,
    empty_db_url: str,
    backtests: dict[str, Backtest],
    tmp_path: Path,
) -> None:
    s = Settings(partitions=PARTITIONS)
    ensure_topics(broker.bootstrap, [*s.event_topics, s.topic_dead_letter], s.partitions)
    ensure_topics(broker.bootstrap, [s.topic_items], s.partitions, compacted=[s.topic_items])
    env = {
        "ISTREAM_KAFKA_BOOTSTRAP": broker.bootstrap,
        "ISTREAM_DATABASE_URL": empty_db_url,
        "ISTREAM_DEVICE": "cpu",
        "ISTREAM_PARTITIONS": str(PARTITIONS),
    }
    # A fresh database migrated by `istream db upgrade` with the model's width (ISTREAM_VECTOR_DIM unset).
    up = run_cli("db", "upgrade", env={**env, "ISTREAM_MODEL": model})
    assert up.returncode == 0, up.stderr
    assert f"{published_dim(Settings(model=model))} dimensions" in up.stdout, up.stdout
    assert _seed_encodings(empty_db_url, backtests[model].encodings) >= _texts(ml100k)
    log = tmp_path / "worker.log"
    started = time.monotonic()
    worker = start_worker(
        broker.bootstrap,
        empty_db_url,
        log,
        ISTREAM_MODEL=model,
        ISTREAM_METRICS_PORT="0",
        ISTREAM_DEVICE="cpu",
        ISTREAM_PARTITIONS=str(PARTITIONS),
        ISTREAM_BATCH_SIZE=str(BATCH),
        ISTREAM_BATCH_SECONDS=str(BATCH_SECONDS if mode == "paced" else BACKLOG_BATCH_SECONDS),
    )
    try:
        n = N_EVENTS[model]
        speed = _paced_speed(ml100k, n) if mode == "paced" else 0.0
        replay = run_cli(
            "replay",
            "--movielens",
            str(ml100k),
            "--limit",
            str(n),
            "--speed",
            f"{speed:.0f}",
            env=env,
            # Paced, the replay itself lasts n / BATCH * BATCH_SECONDS: 100 s for 20,000 events.
            timeout=300 + 2 * n / BATCH * BATCH_SECONDS,
        )
        assert replay.returncode == 0, replay.stderr
        deadline = 900 * max(1.0, n / 5000)  # a deadline for a hang, not a speed target
        wait_for(lambda: _applied(empty_db_url) >= n, deadline, f"{n} applied", worker, log)
    finally:
        assert stop_worker(worker) == 0, log.read_text()[-3000:]
    live_s = time.monotonic() - started

    report = backtests[model].result()
    out = tmp_path / "live"
    ev = run_cli(
        "evaluate",
        "--out",
        str(out),
        "--against",
        str(report),
        "--quiet",
        env=env,
        timeout=120 + n / 50,
    )
    assert ev.returncode == 0, ev.stderr
    live = _totals(out, f"live:{model}")
    bt = _totals(report, model)
    print(f"\n{model} {mode} ({n} events, batch {BATCH}, worker {live_s:.0f}s):\n{ev.stdout}")
    learned = json.loads((out / "result.json").read_text())["totals"]["learned"][f"live:{model}"]
    learned_bt = json.loads((report / "result.json").read_text())["totals"]["learned"][model]
    print(f"learned slice: live {learned} / backtest {learned_bt}")
    assert live["n"] == bt["n"]  # the same positives, ranked once each
    for k in METRICS:
        band = tolerance(k, bt[k], bt["n"], model)
        assert abs(live[k] - bt[k]) <= band, f"{model} {mode} {k}: live {live[k]} vs {bt[k]} (band {band})"
