"""The benchmark and experiment scripts treat a wrong data folder as a user mistake too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("script", "flag", "prefix", "more"),
    [
        ("scripts/backtest_prefix.py", "--data", "backtest_prefix: ", ["--limit", "10"]),
        ("bench/bench_backtest.py", "--lastfm", "bench_backtest: ", ["--limit", "10"]),
        ("scripts/demo_shift.py", "--data", "demo_shift: ", ["--events", "10"]),
    ],
)
def test_a_folder_without_the_data_is_one_line_and_exit_1(
    tmp_path: Path, script: str, flag: str, prefix: str, more: list[str]
) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / script), flag, str(tmp_path), *more],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), out.stderr
    assert str(tmp_path) in lines[0]
