"""`istream backtest`: user mistakes end in one line and a non-zero exit; a small log gives a report."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from stream.cli import main
from stream.sources import synthetic_log


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def istream(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Ran]:
    """Run `istream ARGS` in-process through its real entry point (exit codes and messages included)."""

    def run(*args: str) -> Ran:
        monkeypatch.setattr(sys, "argv", ["istream", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)

    return run


def test_mistakes_are_one_line(tmp_path: Path, istream: Callable[..., Ran]) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in synthetic_log(n_users=3, n_events=30)) + "\n")
    cases = [
        (["backtest"], "give one source"),
        (["backtest", str(log), "--movielens", str(tmp_path)], "give one source"),
        (["backtest", str(log), "--models", "nope"], "unknown model 'nope'"),
        (["backtest", str(log), "--models", "popularity,popularity"], "model named twice"),
        (["backtest", str(log), "--from-offset", "3"], "only apply with --topics"),
        (["backtest", str(tmp_path / "missing.jsonl")], "no such event log"),
        (["backtest", "--movielens", str(tmp_path)], "is not a MovieLens 100K folder"),
        (["backtest", str(log), "--models", "popularity:abc"], "popularity:<half-life days> expected"),
    ]
    for args, message in cases:
        out = istream(*args)
        assert out.returncode != 0, args
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_jsonl_log_gives_a_table_and_a_report_folder(tmp_path: Path, istream: Callable[..., Ran]) -> None:
    log = tmp_path / "log.jsonl"
    lines = [json.dumps(r) for r in synthetic_log(n_users=5, n_events=200, seed=2)]
    lines.append('{"type": "rating", "event_id": "x"}')
    log.write_text("\n".join(lines) + "\n")
    out_dir = tmp_path / "report"
    res = istream("backtest", str(log), "--models", "popularity,biased_mf", "--out", str(out_dir), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "| popularity |" in res.stdout and "| biased_mf |" in res.stdout
    assert "1 invalid records skipped" in res.stderr
    doc = json.loads((out_dir / "result.json").read_text())
    assert set(doc["totals"]["warm"]) == {"popularity", "biased_mf"}
    assert doc["data"]["sha256"] and doc["data"]["rejected"] == 1
    assert doc["code"]["git_commit"]
    assert (out_dir / "summary.md").read_text().startswith("# Backtest summary")
    assert (out_dir / "rolling.png").stat().st_size > 10_000
    assert (out_dir / "model_biased_mf.png").is_file() and (out_dir / "rolling_ndcg_at_10.png").is_file()
