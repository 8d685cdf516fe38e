"""Helpers for tests that drive the real worker process against the embedded servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text

from storage.db import make_engine
from stream import demo
from stream.broker import env_without_proxies, make_consumer

ROOT = Path(__file__).resolve().parents[1]


# The suite's default size fits CI (well under 15 minutes on 2 loaded cores). ISTREAM_TEST_THOROUGH=1
# adds the longer variants: the fault, scale-out and live tests for the untrained model as well
# as the learned default (the same plumbing, without a training thread), and 20 shutdown stops.
THOROUGH = os.environ.get("ISTREAM_TEST_THOROUGH", "") not in ("", "0")

# Plumbing tests pin the untrained model: it needs no training thread and matches the
# 384-d database conftest's `db_url` is migrated with. Tests of the default model say so.
PLUMBING_MODEL = "decayed_mean"


def start_worker(bootstrap: str, db_url: str, log_path: Path, **env: str) -> subprocess.Popen[bytes]:
    """The worker as `run_cli` runs commands: with only the ISTREAM_* settings given (one set in
    the shell would reach the worker and not the backtest it is compared with)."""
    defaults = {"ISTREAM_BATCH_SECONDS": "0.5", "ISTREAM_MODEL": PLUMBING_MODEL}
    return demo.start_worker(
        bootstrap, db_url, log_path, cwd=ROOT, base_env=_env_without_settings(), **{**defaults, **env}
    )


def _env_without_settings() -> dict[str, str]:
    return {k: v for k, v in env_without_proxies().items() if not k.startswith("ISTREAM_")}


stop_worker = demo.stop_worker


def wait_for(
    check: Callable[[], bool], timeout: float, what: str, proc: Any = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            raise AssertionError(f"worker exited ({proc.returncode}) while waiting for {what}:\n{tail}")
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-4000:] if log else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


def applied_events(db_url: str) -> int:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT coalesce(sum(n_events), 0) FROM user_interests_current")
                ).scalar_one()
            )
    finally:
        engine.dispose()


def read_topic(bootstrap: str, topic: str, expect: int, timeout: float = 30) -> list[dict[str, Any]]:
    """Read JSON values from a topic until `expect` records arrived (or timeout)."""
    consumer = make_consumer(bootstrap, topic, group_id=None, consumer_timeout_ms=2000)
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for msg in consumer:
                out.append(json.loads(msg.value))
    finally:
        consumer.close()
    return out


def start_cli(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`istream ARGS` as `run_cli` runs it, in the background, its output in `log`."""
    return demo.start_cli(args, log, {**_env_without_settings(), **(env or {})}, cwd=ROOT)


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`istream ARGS` as a child process from the repo root, with only the ISTREAM_* settings given."""
    base = _env_without_settings()
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
    )
