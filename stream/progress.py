"""Progress of long work: a tqdm bar on a terminal, periodic plain lines everywhere else.

tqdm redraws its bar with carriage returns, which pile up on one line in a log
file or a CI console. When stderr is not a terminal, `progress` prints a line
every `every_s` seconds instead — done/total, percent, rate and ETA — and one
final line, so a log shows where the work stood and how fast it went.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    n: float

    def update(self, n: float = 1) -> Any: ...


def _duration(seconds: float) -> str:
    whole = max(round(seconds), 0)
    m, s = divmod(whole, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class LineProgress:
    """Progress as periodic lines: `desc: 1,200/5,000 ev (24%), 410 ev/s, ETA 0:09`."""

    def __init__(
        self,
        total: float | None,
        desc: str,
        unit: str = "it",
        every_s: float = 2.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.every_s = every_s
        self.stream = stream
        self.clock = clock
        self.n: float = 0
        self.started = clock()
        self._last = self.started
        self._printed: float | None = None

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.n / elapsed
        done = f"{self.n:,.0f}"
        if self.total:
            pct = 100 * self.n / self.total
            left = (self.total - self.n) / rate if rate > 0 else float("inf")
            eta = _duration(left) if left != float("inf") else "?"
            return (
                f"{self.desc}: {done}/{self.total:,.0f} {self.unit} ({pct:.0f}%), "
                f"{rate:,.0f} {self.unit}/s, elapsed {_duration(elapsed)}, ETA {eta}"
            )
        return f"{self.desc}: {done} {self.unit}, {rate:,.0f} {self.unit}/s, elapsed {_duration(elapsed)}"

    def _print(self) -> None:
        print(self.line(), file=self.stream or sys.stderr, flush=True)
        self._printed = self.n

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            self._print()

    def set_total(self, total: float) -> None:
        self.total = total

    def close(self) -> None:
        if self._printed != self.n:  # the final state, unless the last line already said it
            self._print()


def is_terminal(stream: TextIO | None = None) -> bool:
    s = stream or sys.stderr
    return bool(getattr(s, "isatty", lambda: False)())


@contextmanager
def progress(
    total: float | None,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
    every_s: float = 2.0,
    stream: TextIO | None = None,
) -> Iterator[Progress]:
    """A progress counter: tqdm on a terminal, periodic lines otherwise, nothing when disabled."""
    if not enabled or is_terminal(stream):
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=stream, smoothing=0.1)
        try:
            yield bar
        finally:
            bar.close()
        return
    lines = LineProgress(total, desc, unit, every_s=every_s, stream=stream)
    try:
        yield lines
    finally:
        lines.close()
