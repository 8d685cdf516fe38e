"""Per-partition micro-batches that close on size or age, with a bound on what is held.

A batch holds records of one partition number (a user's events share it on
every topic), so a batch locks one partition and two workers never wait on each
other. `add` waits while `max_pending` records are read but not yet committed:
the consuming agent stops pulling, Faust's buffers fill and fetching pauses —
memory stays bounded when training falls behind.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable

from stream.records import RawRecord

BatchKey = tuple[bool, int]  # (is catalog topic, partition number)


class PartitionBatcher:
    def __init__(
        self,
        max_records: int,
        max_age_s: float,
        max_pending: int,
        is_catalog: Callable[[str], bool] = lambda topic: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_records = max_records
        self.max_age_s = max_age_s
        self.max_pending = max(max_pending, max_records)
        self.is_catalog = is_catalog
        self.clock = clock
        self._open: dict[BatchKey, list[RawRecord]] = {}
        self._opened_at: dict[BatchKey, float] = {}
        self._ready: deque[list[RawRecord]] = deque()
        self._pending = 0  # records read and not yet done (open + ready + in flight)
        self._has_ready = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self.sealed = False  # stopping: what arrives now is left for the restart to re-read

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def ready_batches(self) -> int:
        return len(self._ready)

    def _key(self, rec: RawRecord) -> BatchKey:
        return (self.is_catalog(rec.topic), rec.partition)

    def seal(self) -> None:
        """Take no more records (shutdown): a flush then commits only what was held."""
        self.sealed = True
        self._has_room.set()

    async def add(self, rec: RawRecord) -> None:
        while self._pending >= self.max_pending and not self.sealed:
            if not self._ready:
                # Full, and nothing closed to work on: waiting for the open batches to age
                # would leave the trainer idle (intake is paused, they cannot fill up).
                self.close_all()
            self._has_room.clear()
            await self._has_room.wait()
        if self.sealed:
            return  # never committed, so re-read from Postgres' offsets on restart
        key = self._key(rec)
        buf = self._open.get(key)
        if buf is None:
            buf = self._open[key] = []
            self._opened_at[key] = self.clock()
        buf.append(rec)
        self._pending += 1
        if len(buf) >= self.max_records:
            self._close(key)

    def _close(self, key: BatchKey) -> None:
        batch = self._open.pop(key)
        self._opened_at.pop(key, None)
        # Catalog batches first: events that arrive with their items should find them.
        if key[0]:
            self._ready.appendleft(batch)
        else:
            self._ready.append(batch)
        self._has_ready.set()

    def close_expired(self) -> None:
        """When a partition's batch is due, close the others too: they go in the same transaction."""
        now = self.clock()
        if any(now - t >= self.max_age_s for t in self._opened_at.values()):
            self.close_all()

    def close_all(self) -> None:
        for key in list(self._open):
            self._close(key)

    def take_ready(self) -> list[RawRecord] | None:
        """The next closed batch, joined by the closed batches behind it up to `max_records`.

        At low rates this makes one transaction per age window rather than one per
        partition; at high rates batches are full and go one by one.
        """
        if not self._ready:
            self._has_ready.clear()
            return None
        batch = self._ready.popleft()
        while self._ready and len(batch) + len(self._ready[0]) <= self.max_records:
            batch = batch + self._ready.popleft()
        return batch

    async def next_batch(self) -> list[RawRecord]:
        while True:
            batch = self.take_ready()
            if batch is not None:
                return batch
            await self._has_ready.wait()

    def done(self, batch: list[RawRecord]) -> None:
        self._forget(len(batch))

    def _forget(self, n: int) -> None:
        self._pending -= n
        if self._pending < self.max_pending:
            self._has_room.set()

    def drop_partitions(self, partitions: Iterable[tuple[str, int]]) -> int:
        """Discard what is held for revoked partitions; their new owner reads them from Postgres' offsets."""
        gone = set(partitions)
        dropped = 0
        for key in list(self._open):
            kept = [r for r in self._open[key] if (r.topic, r.partition) not in gone]
            dropped += len(self._open[key]) - len(kept)
            if kept:
                self._open[key] = kept
            else:
                self._open.pop(key)
                self._opened_at.pop(key, None)
        ready: deque[list[RawRecord]] = deque()
        for batch in self._ready:
            kept = [r for r in batch if (r.topic, r.partition) not in gone]
            dropped += len(batch) - len(kept)
            if kept:
                ready.append(kept)
        self._ready = ready
        self._forget(dropped)
        return dropped

    def drop_all(self) -> int:
        """Discard everything held; after a rebalance every partition is re-read from Postgres' offsets."""
        keys = {(r.topic, r.partition) for buf in self._open.values() for r in buf}
        keys |= {(r.topic, r.partition) for batch in self._ready for r in batch}
        return self.drop_partitions(keys)
