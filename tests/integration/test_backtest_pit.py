"""Point-in-time mode against the real embedded Postgres: the as-of SQL function reads a backtest."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from models.baselines import PopularityModel
from models.core import BatchResult
from models.decayed_mean import DecayedMeanModel
from models.events import Event
from storage.db import make_engine
from stream.backtest import BacktestConfig, from_records, run_backtest
from stream.backtest.pit import PointInTimeWriter
from stream.cli import main
from stream.settings import get_settings
from stream.sources import synthetic_log
from tests.fakes import HashEncoder

pytestmark = pytest.mark.integration


def test_backtest_vectors_are_queryable_as_of_event_time(db_url: str) -> None:
    data = from_records(synthetic_log(n_users=6, n_events=240, seed=4))
    models = {"decayed_mean": DecayedMeanModel(HashEncoder(16)), "popularity": PopularityModel()}
    seen: list[tuple[str, float, np.ndarray]] = []  # what decayed_mean published, batch by batch

    with PointInTimeWriter(db_url, "bt_run1", models, base_model="hash-16") as writer:

        def hook(name: str, events: Sequence[Event], result: BatchResult) -> None:
            writer(name, events, result)
            if name == "decayed_mean":
                seen.extend((u.user_id, u.last_event_ts, u.vector) for u in result.updates.values())

        run_backtest(models, data, BacktestConfig(batch_size=40, progress=False), on_learned=hook)
        assert writer.schemas == {"decayed_mean": "bt_run1_decayed_mean", "popularity": "bt_run1_popularity"}

    engine = make_engine(db_url)
    with engine.connect() as conn:
        # Production tables in public stay untouched.
        assert conn.execute(text("SELECT count(*) FROM public.user_interest_vectors")).scalar() == 0
        n = conn.execute(text("SELECT count(*) FROM bt_run1_decayed_mean.user_interest_vectors")).scalar()
        assert n == len(seen)
        # Ask, for one user, the vector as of an event time between two of their batches.
        user = "user-2"
        mine = sorted((ts, vec) for u, ts, vec in seen if u == user)
        assert len(mine) >= 3
        at = (mine[1][0] + mine[2][0]) / 2
        row = conn.execute(
            text(
                "SELECT vector::real[], extract(epoch FROM last_event_ts) FROM "
                "bt_run1_decayed_mean.user_vector_as_of(:u, to_timestamp(:at), true)"
            ),
            {"u": user, "at": at},
        ).one()
        np.testing.assert_allclose(np.asarray(row[0]), mine[1][1], rtol=1e-5, atol=1e-6)
        assert float(row[1]) == pytest.approx(mine[1][0])
        # Top items work inside the schema too (item vectors of the named version were published).
        top = conn.execute(
            text("SELECT item_id FROM bt_run1_decayed_mean.user_top_items(:u, 5, true)"), {"u": user}
        ).all()
        assert len(top) == 5
        pop = conn.execute(
            text("SELECT count(DISTINCT user_id) FROM bt_run1_popularity.user_interests_current")
        )
        assert pop.scalar() == 6
    engine.dispose()

    with pytest.raises(ValueError, match="already exists"):
        PointInTimeWriter(db_url, "bt_run1", {"popularity": PopularityModel()}, base_model="x")
    PointInTimeWriter(
        db_url, "bt_run1", {"popularity": PopularityModel()}, base_model="x", replace=True
    ).close()


def test_cli_pit_mode_writes_a_schema_per_model(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in synthetic_log(n_users=4, n_events=80, seed=1)) + "\n")
    monkeypatch.setenv("ISTREAM_DATABASE_URL", db_url)
    get_settings.cache_clear()
    args = [
        "istream",
        "backtest",
        str(log),
        "--models",
        "biased_mf",
        "--pit",
        "cli",
        "--no-report",
        "--quiet",
    ]
    monkeypatch.setattr(sys, "argv", args)
    try:
        main()
    finally:
        get_settings.cache_clear()
    assert "point-in-time vectors of biased_mf: schema cli_biased_mf" in capsys.readouterr().out
    engine = make_engine(db_url)
    with engine.connect() as conn:
        users = conn.execute(text("SELECT count(*) FROM cli_biased_mf.user_interests_current")).scalar()
    engine.dispose()
    assert users == 4
