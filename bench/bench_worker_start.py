"""How long a worker takes from its start to its first committed batch, phase by phase.

    python bench/bench_worker_start.py                     # the learned default, 3 starts
    python bench/bench_worker_start.py --model decayed_mean --starts 5

Starts the embedded broker and Postgres (the integration tests' harness), produces a
synthetic catalog and a backlog, then starts `istream worker` as a child process
`--starts` times against them (each start continues from the last one's offsets, so
the first start restores nothing and the others restore base encodings and weights).
Printed per start, in seconds from the process start, read from the worker's own log:

- `faust`: Faust starts (the CLI's imports, the migration check and the app are done);
- `assigned`: the consumer group assigned the partitions;
- `loaded`: the model is built and restoring (base weights loaded, encodings restored);
- `ready`: weights restored and the catalog read (`worker ready`): batches are learned from here;
- `stop`: seconds from SIGTERM to the exit.

A worker's start is most of what the integration suite waits for (about 45 starts).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.stream_harness import Stack, WorkerProcess, workers  # noqa: E402
from tests.integration.workload import build_workload  # noqa: E402

PHASES = {
    "faust": re.compile(r"\[\^Worker\]: Starting"),
    "assigned": re.compile(r"partitions assigned"),
    "loaded": re.compile(r"restored \d+ base encodings|model loaded"),
    "ready": re.compile(r"worker ready"),
}

COLUMNS = [*PHASES, "stop"]


def one_start(stack: Stack, worker: WorkerProcess, timeout: float) -> dict[str, float]:
    seen: dict[str, float] = {}
    started = time.monotonic()
    worker.start()
    while len(seen) < len(PHASES) and time.monotonic() - started < timeout:
        log = worker.current_log()  # this start's part of the log
        for name, pattern in PHASES.items():
            if name not in seen and pattern.search(log):
                seen[name] = time.monotonic() - started
        worker.assert_alive()
        time.sleep(0.02)  # polling a log file: the figures are rounded to 0.1 s anyway
    t = time.monotonic()
    rc = worker.terminate(timeout=30)
    seen["stop"] = time.monotonic() - t
    if rc != 0:
        raise SystemExit(f"bench_worker_start: the worker exited {rc}\n{worker.tail()}")
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="adapter")
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds a start may take")
    a = p.parse_args()
    if a.starts < 1:
        p.error("--starts must be at least 1")
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp).chmod(0o755)  # the embedded Postgres runs as another user when we are root
        with Stack(Path(tmp), model=a.model) as stack:
            work = build_workload(stack.settings, n_users=200, n_events=200 * (a.starts + 1))
            stack.produce(work.catalog + work.events)
            worker = WorkerProcess(stack, "bench", ISTREAM_BATCH_SIZE="50")
            with workers(worker):
                for i in range(a.starts):
                    row = one_start(stack, worker, a.timeout)
                    rows.append(row)
                    cells = "  ".join(
                        f"{k} {row[k]:5.1f}" if k in row else f"{k}   n/a" for k in [*PHASES, "stop"]
                    )
                    print(f"start {i + 1}/{a.starts} ({a.model}): {cells}", flush=True)
    print(f"\nmedian over {len(rows)} starts, seconds from the process start:")
    for k in COLUMNS:
        values = [r[k] for r in rows if k in r]
        if values:
            print(
                f"  {k:9s} {statistics.median(values):5.1f}  (min {min(values):.1f}, max {max(values):.1f})"
            )


if __name__ == "__main__":
    main()
