"""`istream replay`: push a recorded log into the topics in event time, scaled by a speed factor.

Each user's records keep their order in the log: a record is never sent before
the one of the same user that precedes it, even when the log's timestamps say
otherwise. Catalog records (no event time) go first. Speed N plays N seconds of
event time per second of wall time; speed 0 sends as fast as possible.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from stream.schema import InvalidRecord, parse_ts
from stream.sources import LogLine


@dataclass(frozen=True, slots=True)
class Scheduled:
    at: float  # event-time seconds at which to send (never before the user's previous record)
    seq: int  # position in the log: ties keep log order
    item: LogLine | dict[str, Any]

    def __lt__(self, other: Scheduled) -> bool:
        return (self.at, self.seq) < (other.at, other.seq)


def _record(item: LogLine | dict[str, Any]) -> dict[str, Any] | None:
    return item.record if isinstance(item, LogLine) else item


Line = LogLine | dict[str, Any]


def schedule(items: Iterable[Line]) -> tuple[list[Line], list[Scheduled]]:
    """Split a log into catalog records (first, as read) and timed records, ordered for sending."""
    catalog: list[LogLine | dict[str, Any]] = []
    timed: list[Scheduled] = []
    last_at: dict[str, float] = {}
    previous = float("-inf")  # a record without a usable time goes where it stood in the log
    for seq, item in enumerate(items):
        rec = _record(item)
        if rec is not None and rec.get("type") == "item":
            catalog.append(item)
            continue
        try:
            at = parse_ts(rec.get("ts")) if rec is not None else previous
        except InvalidRecord:
            at = previous
        user = rec.get("user_id") if rec is not None else None
        if isinstance(user, str):
            at = max(at, last_at.get(user, float("-inf")))
            last_at[user] = at
        previous = at if at != float("-inf") else previous
        heapq.heappush(timed, Scheduled(at, seq, item))
    ordered = [heapq.heappop(timed) for _ in range(len(timed))]
    # Records before the first usable time play at the start.
    first = next((s.at for s in ordered if s.at != float("-inf")), 0.0)
    return catalog, [Scheduled(s.at if s.at != float("-inf") else first, s.seq, s.item) for s in ordered]


def paced(
    timed: list[Scheduled],
    speed: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[LogLine | dict[str, Any]]:
    """Yield records when their (scaled) moment comes; speed <= 0: at once."""
    if not timed:
        return
    t0 = timed[0].at
    start = clock()
    for s in timed:
        if speed > 0:
            due = start + (s.at - t0) / speed
            delay = due - clock()
            if delay > 0:
                sleep(delay)
        yield s.item
