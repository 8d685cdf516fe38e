"""Replay scheduling: event-time order, each user's log order kept, timing scaled by speed."""

from __future__ import annotations

from typing import Any

from stream.replay import paced, schedule


def ev(user: str, ts: Any, n: int) -> dict[str, Any]:
    return {"type": "click", "event_id": f"e{n}", "user_id": user, "item_id": "i", "ts": ts}


def test_catalog_first_then_event_time() -> None:
    log = [ev("a", 3000, 1), {"type": "item", "item_id": "i", "text": "t"}, ev("b", 1000, 2)]
    catalog, timed = schedule(log)
    assert catalog == [log[1]]
    assert [s.item["event_id"] for s in timed] == ["e2", "e1"]  # type: ignore[index]


def test_a_users_order_in_the_log_is_kept_even_against_timestamps() -> None:
    log = [ev("a", 5000, 1), ev("a", 1000, 2), ev("b", 2000, 3)]
    _, timed = schedule(log)
    order = [s.item["event_id"] for s in timed]  # type: ignore[index]
    assert order.index("e1") < order.index("e2")
    assert order[0] == "e3"


def test_unparseable_times_stay_where_they_stood() -> None:
    log = [ev("a", 1000, 1), ev("b", "yesterday", 2), ev("c", 2000, 3)]
    _, timed = schedule(log)
    assert [s.item["event_id"] for s in timed] == ["e1", "e2", "e3"]  # type: ignore[index]


def test_speed_scales_the_gaps() -> None:
    _, timed = schedule([ev("a", 0, 1), ev("a", 10_000, 2), ev("b", 30_000, 3)])
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    out = list(paced(timed, speed=10, clock=lambda: now[0], sleep=sleep))
    assert len(out) == 3
    assert [round(s, 6) for s in slept] == [1.0, 2.0]  # 10 s and 20 s of event time at 10x


def test_speed_zero_does_not_wait() -> None:
    _, timed = schedule([ev("a", 0, 1), ev("a", 10_000_000, 2)])
    assert len(list(paced(timed, speed=0, sleep=lambda s: (_ for _ in ()).throw(AssertionError)))) == 2
