"""The Last.fm-2k loader, on a tiny folder written here (never the shared data)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from stream.backtest.data import load_lastfm
from stream.cli import cli
from stream.sources import SourceError, lastfm_source

MONTH1, MONTH2 = 1122854400, 1125532800  # 2005-08-01, 2005-09-01 (00:00 UTC)


def _write(folder: Path, events: str, tags: str, artists: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "events.csv").write_text("user_id,item_id,timestamp,weight\r\n" + events)
    (folder / "tag_events.csv").write_text("user_id,item_id,tag,timestamp\r\n" + tags)
    (folder / "artists.csv").write_text("item_id,name\r\n" + artists, encoding="utf-8")
    return folder


@pytest.fixture
def lastfm(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "lastfm",
        events=f"2,20,{MONTH1},1\n1,10,{MONTH1},2\n1,11,{MONTH2},1\n2,99,{MONTH2},1\n",
        tags=(
            f'1,10,rock,{MONTH1}\n1,10,"post-punk, 80s",{MONTH1}\n2,20,jazz,{MONTH1}\n'
            f"1,11,pop,{MONTH2}\n1,10,classic,{MONTH2}\n1,10,classic,{MONTH2}\n"
        ),
        artists='10,Joy Division\n11,"Earth, Wind & Fire"\n20,\n30,Never Tagged\n',
    )


def test_clicks_searches_catalog_and_order(lastfm: Path) -> None:
    data = load_lastfm(lastfm)
    # The catalog is the artists that events name, text = name; 30 is never named by an event.
    texts = {i.item_id: i.text for i in data.items}
    assert texts == {"10": "Joy Division", "20": "", "11": "Earth, Wind & Fire", "99": ""}
    assert data.source["kind"] == "lastfm"
    assert data.source["unnamed_items"] == 1  # artist 20: in artists.csv with no name
    assert data.source["items_not_in_artists"] == 1  # artist 99
    assert set(data.source["sha256"]) == {"events.csv", "tag_events.csv", "artists.csv"}
    # A repeated tag row is one event applied once, reported as a duplicate.
    assert data.duplicates == 1
    assert not data.rejected
    kinds = [(e.kind, e.user_id, e.target_item, e.query) for e in data.events]
    assert kinds == [
        ("click", "1", "10", None),
        ("search", "1", "10", "post-punk, 80s"),
        ("search", "1", "10", "rock"),
        ("click", "2", "20", None),
        ("search", "2", "20", "jazz"),
        ("search", "1", "10", "classic"),
        ("click", "1", "11", None),
        ("search", "1", "11", "pop"),
        ("click", "2", "99", None),
    ]
    assert [e.ts for e in data.events[:5]] == [float(MONTH1)] * 5
    assert len({e.event_id for e in data.events}) == len(data.events)


def test_limit_and_bad_rows(tmp_path: Path) -> None:
    folder = _write(
        tmp_path / "bad",
        events=f"1,10,{MONTH1},1\n,10,{MONTH1},1\n1,12,last-month,1\n",
        tags=f"1,10,rock,{MONTH1}\n",
        artists="10,A\n12,B\n",
    )
    data = load_lastfm(folder)
    # An empty user and an unreadable time are rejected with the schema's reason, never dropped.
    reasons = sorted(r.reason for r in data.rejected)
    assert len(reasons) == 2
    assert any("user_id" in r for r in reasons) and any("RFC 3339" in r for r in reasons)
    assert len(data.events) == 2
    assert len(load_lastfm(folder, limit=1).events) <= 1


def test_not_a_lastfm_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"not a Last\.fm-2k folder"):
        lastfm_source(tmp_path)
    folder = _write(tmp_path / "x", events="", tags="", artists="")
    (folder / "events.csv").write_text("user,artist,when\n")
    with pytest.raises(SourceError, match="header"):
        lastfm_source(folder)


def test_backtest_cli_takes_lastfm(lastfm: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(
        cli,
        ["backtest", "--lastfm", str(lastfm), "--models", "popularity", "--no-report", "--quiet"],
    )
    assert out.exit_code == 0, out.output
    assert "full stream" in out.output
