"""Offline fits (`models.core.OfflineFit`, e.g. SASRec) for the backtest, here or in a child process."""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import pickle
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TextIO

from models.core import OfflineFit
from models.events import Event


class _NoTerminal(io.TextIOBase):
    """stderr for a child whose parent's progress bar holds the terminal: progress written
    as lines (what models do when stderr is no terminal) scrolls above that bar."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False


def _fit_offline(model: OfflineFit, events: Sequence[Event]) -> tuple[dict[str, Any], float]:
    t = time.perf_counter()
    report = dict(model.fit_offline(events))
    return report, time.perf_counter() - t


Fitted = dict[str, tuple[OfflineFit, dict[str, Any], float]]  # name -> (fitted model, report, seconds)


def _fit_in_child(models: Mapping[str, OfflineFit], events: Sequence[Event], conn: Connection) -> None:
    """The child's whole job: fit each model and send it back whole, or send why it could not."""
    sys.stderr = _NoTerminal(sys.stderr)
    try:
        out: Fitted = {name: (m, *_fit_offline(m, events)) for name, m in models.items()}
        # Plain pickle, not the connection's: that one shares torch tensors as file descriptors,
        # which vanish with this process before the parent has read them.
        conn.send_bytes(pickle.dumps(("ok", out)))
    except BaseException as exc:  # the parent raises it; a child has nobody else to tell
        conn.send_bytes(pickle.dumps(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))
    finally:
        conn.close()


# glibc serves big blocks with mmap and hands them back on free, so the fit's (positions x items)
# logits, allocated afresh at every step, page-fault in again each time: in this VM that was
# a fifth of a SASRec step (314 -> 250 ms/step over 30 steps of 128 x 50 on ML-100K's catalog).
# The child keeps freed memory instead; it lives for one fit, so its peak heap is all it holds.
_FIT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """`values` in os.environ for the block (a spawned child inherits them), then as before."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class OfflineFits:
    """The offline fits (`OfflineFit`, e.g. SASRec) of one backtest, started before the replay.

    In the background they run in one child process while this one replays the online
    models: both are single-threaded, so on two cores the fit (most of a SASRec backtest's
    time) costs little wall time beyond its own. A child is spawned (not forked: torch's
    thread pools do not survive a fork), receives the models pickled and sends them back
    fitted; the fit is seeded, so it is the same fit as in this process.
    """

    def __init__(self, models: Mapping[str, OfflineFit], events: Sequence[Event], background: bool) -> None:
        self._models = dict(models)
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._done: dict[str, tuple[dict[str, Any], float]] = {}
        if background and models:
            ctx = multiprocessing.get_context("spawn")
            self._conn, child_end = ctx.Pipe(duplex=False)
            # daemon: the fit dies with this process (an interrupted backtest leaves no orphan).
            self._proc = ctx.Process(
                target=_fit_in_child, args=(self._models, events, child_end), name="offline-fit", daemon=True
            )
            with _environ(_FIT_MALLOC):
                self._proc.start()
            child_end.close()
        else:
            self._done = {name: _fit_offline(m, events) for name, m in models.items()}

    def collect(self) -> dict[str, tuple[dict[str, Any], float]]:
        """Wait for the fits; each caller's model object takes its fitted copy's state."""
        if self._conn is not None:
            try:
                status, payload = pickle.loads(self._conn.recv_bytes())
            except EOFError:
                assert self._proc is not None
                self._proc.join(5)
                raise RuntimeError(
                    f"the offline fit's process died (exit code {self._proc.exitcode}); "
                    "ISTREAM_BACKTEST_FIT_IN_BACKGROUND=false fits in this process"
                ) from None
            if status != "ok":
                raise RuntimeError(f"offline fit failed in its child process: {payload}")
            for name, (fitted, report, took) in payload.items():
                # The caller keeps the object it built (it may read it after the backtest).
                vars(self._models[name]).update(vars(fitted))
                self._done[name] = (report, took)
            assert self._proc is not None
            self._proc.join(10)  # it has sent all it had: let it exit on its own
            self.close()
        return self._done

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.terminate()
            self._proc.join(10)
            self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def background_fits_pay() -> bool:
    """A child process only pays where a second core can run it (the cores this process may
    use where the OS says, e.g. in a container limited by affinity; else all of them)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (usable or 1) >= 2
