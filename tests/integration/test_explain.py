"""`istream explain USER` against the real embedded Postgres and the packaged MiniLM."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from models.events import Event, Item
from storage.db import make_engine, upgrade
from stream.cli import cli
from stream.explain import explain_user
from stream.runtime import build_interest_model, build_store, published_dim
from stream.settings import Settings, get_settings

pytestmark = pytest.mark.integration

ITEMS = [
    Item("1", "Star Wars (1977)", {"genres": ["Action", "Sci-Fi"]}),
    Item("2", "The Empire Strikes Back (1980)", {"genres": ["Action", "Sci-Fi"]}),
    Item("3", "Sleepless in Seattle (1993)", {"genres": ["Comedy", "Romance"]}),
    Item("4", "Toy Story (1995)", {"genres": ["Animation"]}),
]


def test_explain_weighs_the_users_events(empty_db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db_url = empty_db_url
    settings = Settings(
        database_url=db_url,
        model="adapter",
        device="cpu",
        model_publish_every_steps=1,
        model_events_per_step=1,
    )
    upgrade(db_url, vector_dim=published_dim(settings))
    store = build_store(settings, db_url)
    model = build_interest_model(settings)
    store.upsert_items(ITEMS)
    model.upsert_items(ITEMS)
    events = [
        Event("a", "u1", 1000.0, "rating", item_id="1", rating=5.0),
        Event("b", "u1", 1100.0, "rating", item_id="3", rating=2.0),
        Event("c", "u1", 1200.0, "click", item_id="2"),
        Event("d", "u2", 1300.0, "click", item_id="4"),
    ]
    result = model.learn(events)
    assert result.snapshot is not None
    store.publish_model(result.snapshot, "minilm")
    store.commit_batch(result.model_version, result.updates, events)

    engine = make_engine(db_url)
    out = explain_user(settings, engine, "u1", top=5)
    assert out.model_version == result.snapshot.version and out.n_events == 3
    events_rows = [r for r in out.rows if r["kind"] in ("rating", "click")]
    assert {r["item_id"] for r in events_rows} == {"1", "2", "3"}
    assert {r["title"] for r in events_rows} >= {"Star Wars (1977)"}
    assert sum(r["weight"] for r in out.rows) == pytest.approx(1.0, abs=1e-3)
    engine.dispose()

    monkeypatch.setenv("ISTREAM_DATABASE_URL", db_url)
    monkeypatch.setenv("ISTREAM_MODEL", "adapter")
    get_settings.cache_clear()
    try:
        ok = CliRunner().invoke(cli, ["explain", "u1", "--top", "3"])
        assert ok.exit_code == 0, ok.output
        assert "Empire Strikes Back" in ok.output or "Star Wars" in ok.output
        missing = CliRunner().invoke(cli, ["explain", "nobody"])
        assert missing.exit_code != 0 and "no applied events" in missing.output
    finally:
        get_settings.cache_clear()
