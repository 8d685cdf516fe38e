"""CLI misuse ends in one line on stderr and a non-zero exit, never a stack trace."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]


def istream(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, timeout=60)


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["no-such-command"], {}, "No such command"),
        (["produce"], {}, "give one of FILE, --movielens DIR or --lastfm DIR"),
        (["produce", "x.jsonl"], {}, "ISTREAM_KAFKA_BOOTSTRAP is not set"),
        (["produce", "nope.jsonl"], {"ISTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1"}, "no such event log"),
        (["produce", "--movielens", "/tmp"], {"ISTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1"}, "not a MovieLens"),
        (["demo", "--events", "3"], {}, "--events"),
        (["demo", "--data", "/tmp"], {}, "not a MovieLens"),
        (["db", "upgrade"], {}, "ISTREAM_DATABASE_URL is not set"),
        (["worker"], {"ISTREAM_PARTITIONS": "zero"}, "ISTREAM_PARTITIONS"),
        (["worker"], {"ISTREAM_DEVICE": "tpu"}, "ISTREAM_DEVICE"),
    ],
)
def test_misuse_is_one_line(args: list[str], env: dict[str, str], words: str) -> None:
    result = istream(*args, **env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("istream: ") and words in lines[0]
    assert "Traceback" not in result.stderr


def test_help_works() -> None:
    result = istream("--help")
    assert result.returncode == 0 and "worker" in result.stdout
