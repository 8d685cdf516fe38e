"""One progress helper for the demo, the backtest, evaluate and produce: lines in logs, a bar on a TTY."""

from __future__ import annotations

import io

from stream.progress import LineProgress, progress


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_lines_with_rate_and_eta_and_no_carriage_returns() -> None:
    out = io.StringIO()
    clock = Clock()
    bar = LineProgress(1000, "applying", unit="ev", every_s=2.0, stream=out, clock=clock)
    for _ in range(10):
        clock.t += 1.0
        bar.update(50)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 5  # every 2 s over 10 s; the last one already said where it ended
    assert lines[0] == "applying: 100/1,000 ev (10%), 50 ev/s, elapsed 0:02, ETA 0:18"
    assert lines[-1] == "applying: 500/1,000 ev (50%), 50 ev/s, elapsed 0:10, ETA 0:10"


def test_close_prints_the_final_state_once() -> None:
    out = io.StringIO()
    clock = Clock()
    bar = LineProgress(None, "producing", unit="rec", every_s=5.0, stream=out, clock=clock)
    clock.t = 1.0
    bar.update(7)
    bar.close()
    assert out.getvalue() == "producing: 7 rec, 7 rec/s, elapsed 0:01\n"


def test_non_tty_gets_lines_and_disabled_prints_nothing() -> None:
    out = io.StringIO()  # not a terminal
    with progress(10, "backtest", unit="ev", stream=out) as bar:
        bar.update(10)
    assert isinstance(bar, LineProgress)
    assert out.getvalue().startswith("backtest: 10/10 ev (100%)")
    quiet = io.StringIO()
    with progress(10, "backtest", enabled=False, stream=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""
