"""Per-partition batches: close on size or age, bounded intake, dropping on rebalance."""

from __future__ import annotations

import asyncio

from stream.batcher import PartitionBatcher
from stream.records import RawRecord


def rec(partition: int, offset: int, topic: str = "interest.clicks") -> RawRecord:
    return RawRecord(topic, partition, offset, b"u", b"{}")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_batches_close_on_size_per_partition() -> None:
    async def go() -> None:
        b = PartitionBatcher(max_records=3, max_age_s=10, max_pending=100)
        for i in range(3):
            await b.add(rec(0, i))
            await b.add(rec(1, i))
        first, second = await b.next_batch(), await b.next_batch()
        assert [r.partition for r in first] == [0, 0, 0]
        assert [r.partition for r in second] == [1, 1, 1]
        assert [r.offset for r in first] == [0, 1, 2]

    asyncio.run(go())


def test_batches_close_on_age_and_catalog_goes_first() -> None:
    async def go() -> None:
        clock = Clock()
        b = PartitionBatcher(3, 1.0, 100, is_catalog=lambda t: t == "items", clock=clock)
        await b.add(rec(0, 0))
        clock.now = 0.5
        await b.add(rec(0, 0, topic="items"))
        b.close_expired()
        assert b.take_ready() is None
        clock.now = 1.1
        b.close_expired()  # the clicks batch is due; the younger items batch goes with it
        batch = b.take_ready()
        assert batch is not None and [r.topic for r in batch] == ["items", "interest.clicks"]
        assert b.take_ready() is None


def test_ready_batches_coalesce_up_to_the_size() -> None:
    async def go() -> None:
        b = PartitionBatcher(max_records=4, max_age_s=10, max_pending=100)
        for p in range(3):
            await b.add(rec(p, 0))
            await b.add(rec(p, 1))
        b.close_all()
        first, second = b.take_ready(), b.take_ready()
        assert first is not None and sorted({r.partition for r in first}) == [0, 1] and len(first) == 4
        assert second is not None and {r.partition for r in second} == {2}

    asyncio.run(go())


def test_intake_waits_when_pending_is_full() -> None:
    async def go() -> None:
        b = PartitionBatcher(max_records=2, max_age_s=10, max_pending=4)
        for i in range(4):
            await b.add(rec(0, i))
        blocked = asyncio.create_task(b.add(rec(0, 4)))
        await asyncio.sleep(0.05)
        assert not blocked.done()  # backpressure: the agent stops pulling
        batch = await b.next_batch()
        b.done(batch)
        await asyncio.wait_for(blocked, 1)
        assert b.pending == 3

    asyncio.run(go())


def test_drop_all_forgets_held_records_and_frees_room() -> None:
    async def go() -> None:
        b = PartitionBatcher(max_records=2, max_age_s=10, max_pending=4)
        for i in range(3):
            await b.add(rec(i % 2, i))
        assert b.drop_all() == 3
        assert b.pending == 0 and b.take_ready() is None

    asyncio.run(go())


def test_a_full_intake_closes_open_batches_rather_than_wait_for_their_age() -> None:
    """Many partitions, each short of a full batch, and intake at its bound: the trainer must get
    work at once, not after batch_seconds (it would idle while nothing more can be read)."""

    async def go() -> None:
        b = PartitionBatcher(max_records=5, max_age_s=3600, max_pending=8)
        for i in range(8):
            await b.add(rec(i % 4, i))
        assert b.take_ready() is None  # nothing is due yet
        blocked = asyncio.create_task(b.add(rec(0, 99)))
        await asyncio.sleep(0)
        batch = await asyncio.wait_for(b.next_batch(), 1.0)
        assert len(batch) == 4  # two open batches, coalesced up to max_records
        b.done(batch)
        await asyncio.wait_for(blocked, 1.0)
        assert b.pending == 8 - 4 + 1

    asyncio.run(go())


def test_a_sealed_batcher_takes_nothing_more_and_frees_a_blocked_add() -> None:
    """Shutdown: what the agent hands over after the seal is left to be re-read, never held."""

    async def go() -> None:
        b = PartitionBatcher(max_records=2, max_age_s=10, max_pending=2)
        await b.add(rec(0, 0))
        await b.add(rec(0, 1))
        blocked = asyncio.create_task(b.add(rec(0, 2)))
        await asyncio.sleep(0)
        assert not blocked.done()
        b.seal()
        await asyncio.wait_for(blocked, 1.0)  # released without adding
        await b.add(rec(1, 3))
        assert b.pending == 2
        batch = b.take_ready()
        assert batch is not None and [r.offset for r in batch] == [0, 1]
        assert b.take_ready() is None

    asyncio.run(go())
