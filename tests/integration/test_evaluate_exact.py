"""`istream evaluate` on vectors the worker's processor committed equals the backtest, rank for rank.

The same micro-batches go through `BatchProcessor` (into real Postgres) and through the
backtest driver; with the untrained `decayed_mean` the stored vectors are the backtest's,
so every positive must get the same rank both ways. A wrong as-of (a leak of the event
itself, or a stale version), a wrong exclusion of seen items or a wrong model version
would break the equality. Also checks that the Python side reads exactly what
`user_vector_as_of(user, ts, true)` returns, and the `--since/--until` window.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
import pytest
from sqlalchemy import text

from models.core import InterestModel
from models.decayed_mean import DecayedMeanModel
from models.registry import build_model
from storage.db import make_engine, upgrade
from storage.repository import VectorStore
from stream.backtest import BacktestConfig, run_backtest
from stream.backtest.data import from_records
from stream.evaluate import Window, evaluate_live, vectors_as_of
from stream.processor import BatchProcessor
from stream.records import RawRecord
from stream.schema import Limits
from stream.settings import Settings
from stream.sources import synthetic_log
from tests.fakes import HashEncoder
from tests.helpers import run_cli

pytestmark = pytest.mark.integration
BATCH = 40


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    upgrade(empty_db_url, vector_dim=16)
    return empty_db_url


def _records(s: Settings, lines: list[dict]) -> list[RawRecord]:
    out = []
    for n, rec in enumerate(lines):
        topic = s.topic_for_kind(rec["type"])
        out.append(RawRecord(topic, 0, n, rec.get("user_id", "").encode(), json.dumps(rec).encode(), 0))
    return out


def _decayed_mean() -> InterestModel:
    return DecayedMeanModel(HashEncoder(16))


def _adapter() -> InterestModel:
    # Published by steps only (never by the wall clock), so both runs publish at the same batches.
    return build_model(
        "adapter",
        HashEncoder(16),
        dim=15,
        seed=0,
        publish_every_s=1e9,
        publish_every_steps=1,
        events_per_step=10,
    )


@pytest.mark.parametrize(
    ("spec", "make"),
    [("decayed_mean", _decayed_mean), ("adapter", _adapter)],
    ids=["decayed_mean", "adapter"],
)
def test_live_ranks_equal_the_backtests(db_url: str, spec: str, make: Callable[[], InterestModel]) -> None:
    """With the learned model, users without a stored vector are ranked by the prior of the
    newest version that had learned only earlier events (evaluate's `Priors`), as the backtest
    ranks them by the model's prior before it learns their batch."""
    s = Settings(partitions=1)
    log = synthetic_log(n_users=12, n_events=400, switch_at=0.5, seed=3)
    data = from_records(log)
    events = [r for r in log if r["type"] != "item"]
    catalog = [r for r in log if r["type"] == "item"]
    assert [e.event_id for e in data.events] == [r["event_id"] for r in events]  # already in time order

    engine = make_engine(db_url)
    proc = BatchProcessor(
        make(),
        VectorStore(engine, s.group_id),
        {**s.event_topics, s.topic_items: "item"},
        Limits(),
        "hash",
    )
    proc.process(_records(s, catalog))
    for start in range(0, len(events), BATCH):
        proc.process(_records(s, events[start : start + BATCH]))

    config = BacktestConfig(batch_size=BATCH, progress=False)
    bt = run_backtest({spec: make()}, data, config)
    live = evaluate_live(engine, config, show_progress=False)
    name = live.model
    assert name == f"live:{spec}"
    res = live.result
    assert res.counts["ranked"] == bt.counts["ranked"] > 200
    assert res.counts["target_without_vector"] == 0
    # The learned model's prior served every positive whose user had no vector yet; the
    # untrained mean has none (a random guess both ways).
    assert res.counts["served_prior"] == (int((~res.learned).sum()) if spec == "adapter" else 0)
    if spec == "adapter":
        assert res.counts["served_prior"] > 20
    np.testing.assert_array_equal(res.cold, bt.cold)
    np.testing.assert_array_equal(res.learned, bt.learned)
    if spec == "decayed_mean":  # one version: every stored vector is the backtest's, rank for rank
        np.testing.assert_array_equal(res.greater[name], bt.greater[spec])
        np.testing.assert_array_equal(res.ties[name], bt.ties[spec])
        for slice_name in ("warm", "tail", "learned", "cold"):
            assert res.totals(slice_name)[name] == pytest.approx(bt.totals(slice_name)[spec])
    else:
        # Served by a prior: exactly the backtest's ranks (a prior from a version that had
        # learned the event's own batch would rank its item higher).
        prior = ~res.learned
        np.testing.assert_array_equal(res.greater[name][prior], bt.greater[spec][prior])
        np.testing.assert_array_equal(res.ties[name][prior], bt.ties[spec][prior])
        # A stored vector is scored against its own version's items; the backtest scores a user
        # its batch did not touch against the newest version's items, which may have moved
        # since (a version per step here; every 10 steps by default). README "Live vs backtest".
        same = res.greater[name] == bt.greater[spec]
        assert same.mean() >= 0.97, np.flatnonzero(~same)

    # The Python side reads exactly what the SQL function returns, just before each event.
    users = [e.user_id for e in data.events[::25]]
    ts = np.asarray([e.ts for e in data.events[::25]])
    versions, vecs, known = vectors_as_of(engine, users, ts)
    with engine.connect() as conn:
        for n, (user, t) in enumerate(zip(users, ts, strict=True)):
            row = conn.execute(
                text(
                    "SELECT model_version, vector::real[] FROM "
                    "user_vector_as_of(:u, to_timestamp(:t) - interval '1 microsecond', true)"
                ),
                {"u": user, "t": float(t)},
            ).one_or_none()
            assert known[n] == (row is not None)
            if row is not None:
                assert versions[n] == row[0]
                assert vecs is not None
                np.testing.assert_array_equal(vecs[n], np.asarray(row[1], dtype=np.float32))

    # A window ranks only its own positives, with everything before it as history.
    mid = data.events[len(data.events) // 2].ts
    window = evaluate_live(engine, config, Window(since=mid), show_progress=False).result
    in_window = bt.ts >= mid
    assert window.counts["ranked"] == int(in_window.sum())
    np.testing.assert_array_equal(window.greater[name], res.greater[name][in_window])
    engine.dispose()


def test_evaluate_cli_writes_the_backtest_report_folder(db_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = Settings(partitions=1)
    log = synthetic_log(n_users=6, n_events=120, seed=4)
    engine = make_engine(db_url)
    proc = BatchProcessor(
        _decayed_mean(),
        VectorStore(engine, s.group_id),
        {**s.event_topics, s.topic_items: "item"},
        Limits(),
        "hash",
    )
    proc.process(_records(s, [r for r in log if r["type"] == "item"]))
    events = [r for r in log if r["type"] != "item"]
    proc.process(_records(s, events[:60]))
    proc.process(_records(s, events[60:]))
    engine.dispose()
    env = {"ISTREAM_DATABASE_URL": db_url}
    out = run_cli("evaluate", "--out", str(tmp_path / "r"), "--quiet", env=env)
    assert out.returncode == 0, out.stderr
    assert "live:decayed_mean" in out.stdout
    assert {p.name for p in (tmp_path / "r").iterdir()} >= {"result.json", "summary.md", "rolling.png"}
    doc = json.loads((tmp_path / "r" / "result.json").read_text())
    assert doc["protocol"].startswith("live:") and "live:decayed_mean" in doc["totals"]["warm"]
    assert "# Live evaluation summary" in (tmp_path / "r" / "summary.md").read_text()

    # Mistakes: one line, non-zero exit.
    later = str(int(time.time() * 1000))
    bad = run_cli("evaluate", "--since", later, "--until", "1000", "--no-report", env=env)
    assert bad.returncode != 0 and "--since must be before --until" in bad.stderr
    assert "Traceback" not in bad.stderr
    empty = run_cli("evaluate", "--since", later, "--no-report", env=env)
    assert empty.returncode != 0 and "no applied events" in empty.stderr
    nodb = run_cli("evaluate", env={})
    assert nodb.returncode != 0 and "ISTREAM_DATABASE_URL" in nodb.stderr
