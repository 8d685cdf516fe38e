"""Issue 12's shutdown deadlock, forced deterministically on an embedded Postgres.

    python scripts/repro_shutdown_deadlock.py     # this tree: no deadlock, the flush gives up at the grace
    git archive 6d38b94 | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python scripts/repro_shutdown_deadlock.py
                                                  # before the fix: DEADLOCK, pg_advisory_lock never granted

The interleaving: `pump` has B_prev committing (its commit held up by a table lock) and D
(partition 1) staged, so D holds partition 1's advisory lock while pump awaits B_prev's commit
in drain(). Faust runs our flush while pump is alive: run_batch(E), E also partition 1, goes to
the one training thread and waits for D's lock. When B_prev commits, pump's drain queues
finish(B_prev) on that thread behind E: D's commit is never submitted, its lock never freed.

It drives WorkerRuntime's pipeline and run_batch the way Faust did on SIGTERM; the worker no
longer lets them overlap (WorkerRuntime.shutdown stops pump first), so on this tree it shows
the second guard: a partition-lock wait that gives up at the shutdown grace.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import text

from storage.db import EmbeddedPostgres, make_engine, upgrade
from stream.records import RawRecord
from stream.runtime import published_dim
from stream.settings import Settings
from stream.worker import WorkerRuntime

ADVISORY = (
    "SELECT l.pid, l.objid, l.granted, left(a.query, 60) FROM pg_locks l "
    "JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' ORDER BY l.granted DESC"
)


def clicks(p: int, start: int, n: int, user: str) -> list[RawRecord]:
    def value(k: int) -> bytes:
        return json.dumps(
            {"event_id": f"{user}-{k}", "user_id": user, "item_id": "i1", "ts": 1000 * (k + 1)}
        ).encode()

    return [RawRecord("interest.clicks", p, k, user.encode(), value(k)) for k in range(start, start + n)]


async def interleave(url: str) -> None:
    rt = WorkerRuntime(Settings(shutdown_grace_s=3), "127.0.0.1:1", url)
    await asyncio.get_running_loop().run_in_executor(rt.executor, lambda: rt.runner)
    b_prev, d, e = clicks(0, 0, 5, "ua"), clicks(1, 0, 5, "ub"), clicks(1, 5, 5, "ub")
    rt.batcher._ready.append(clicks(2, 0, 1, "uc"))  # more is ready: pump does not drain after B_prev
    admin = make_engine(url).connect()
    admin.exec_driver_sql("LOCK TABLE consumed_offsets IN ACCESS EXCLUSIVE MODE")  # B_prev's commit waits
    await rt.pipeline(b_prev)
    pump = asyncio.create_task(rt.pipeline(d))  # stages D, then awaits B_prev's commit in drain()
    while rt._inflight is not None:  # pump's drain took B_prev: D is staged, its lock held
        await asyncio.sleep(0.05)
    print("pump: D staged (holds partition 1's lock), waiting for B_prev's commit")
    rt.begin_shutdown()  # SIGTERM: the first thing our flush does
    t0 = time.monotonic()
    flush = asyncio.create_task(rt.run_batch(e))
    await asyncio.sleep(1.0)
    admin.rollback()
    print("table lock released: B_prev commits")
    done, _ = await asyncio.wait({pump, flush}, timeout=20)
    with make_engine(url).connect() as conn:
        print(
            "advisory locks (pid, partition, granted, query):",
            [tuple(r) for r in conn.execute(text(ADVISORY))],
        )
    took = time.monotonic() - t0
    if len(done) < 2:
        print(f"DEADLOCK: {took:.0f}s after the stop, pump done={pump.done()}, flush done={flush.done()}")
    else:
        print(f"no deadlock: both ended {took:.1f}s after the stop; the flush's batch: {flush.result()}")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="istream-repro-"))
    root.chmod(0o755)  # the embedded server runs as another user
    pg = EmbeddedPostgres(root / "pg" / "data")
    url = pg.start()

    def stop() -> None:
        sys.stdout.flush()
        pg.stop()
        os._exit(0)  # a deadlocked thread would keep the interpreter from exiting

    threading.Timer(180, stop).start()
    try:
        upgrade(url, vector_dim=published_dim(Settings()))
        asyncio.run(interleave(url))
    finally:
        stop()


if __name__ == "__main__":
    main()
