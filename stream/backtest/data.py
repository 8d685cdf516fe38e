"""What a backtest replays: catalog, events in event-time order, profiles, and what was rejected.

Every source (JSONL log, MovieLens folder, Last.fm-2k folder, topic range) ends up here through the
same validation as the worker (`stream.schema`), so a record the worker would
dead-letter is reported by the backtest with the same reason, never dropped
silently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.events import Event, Item, UserProfile
from stream.schema import DEFAULT_LIMITS, InvalidRecord, Limits, Parsed, Rejected, parse_log_record
from stream.sources import (
    LogLine,
    SourceError,
    lastfm_dir,
    lastfm_source,
    movielens_dir,
    movielens_items,
    movielens_ratings,
    movielens_users,
    read_jsonl,
)


@dataclass(slots=True)
class BacktestData:
    items: list[Item]
    events: list[Event]  # event-time order, ties in arrival order, duplicates removed
    profiles: list[UserProfile] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    duplicates: int = 0
    source: dict[str, Any] = field(default_factory=dict)  # what was read, with content hashes


def assemble(
    parsed: Iterable[Parsed],
    source: dict[str, Any] | None = None,
    profiles: Iterable[UserProfile] = (),
) -> BacktestData:
    """Keep the last version of each item, drop duplicate event ids, order events by event time."""
    items: dict[str, Item] = {}
    events: list[Event] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    duplicates = 0
    for p in parsed:
        if isinstance(p, Rejected):
            rejected.append(p)
        elif isinstance(p, Item):
            items[p.item_id] = p
        elif p.event_id in seen:
            duplicates += 1  # a replayed or retried event: applied once, as the worker does
        else:
            seen.add(p.event_id)
            events.append(p)
    events.sort(key=lambda e: e.ts)  # stable: equal times keep log order
    return BacktestData(
        items=list(items.values()),
        events=events,
        profiles=list(profiles),
        rejected=rejected,
        duplicates=duplicates,
        source=source or {"kind": "records"},
    )


def _parse_records(records: Iterable[dict[str, Any] | LogLine], limits: Limits) -> Iterable[Parsed]:
    for n, rec in enumerate(records, 1):
        if isinstance(rec, LogLine):
            where, raw = f"line {rec.lineno}", rec.record
            if raw is None:
                yield Rejected(where, "not a JSON object")
                continue
        else:
            where, raw = f"record {n}", rec
        try:
            yield parse_log_record(raw, limits)
        except InvalidRecord as exc:
            yield Rejected(where, exc.reason)


def from_records(
    records: Iterable[dict[str, Any] | LogLine],
    limits: Limits = DEFAULT_LIMITS,
    source: dict[str, Any] | None = None,
    profiles: Iterable[UserProfile] = (),
) -> BacktestData:
    """Validate records (dicts or JSONL lines) as the worker does, then `assemble`."""
    return assemble(_parse_records(records, limits), source, profiles)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_jsonl(path: Path, limits: Limits = DEFAULT_LIMITS, limit: int | None = None) -> BacktestData:
    if not path.is_file():
        raise SourceError(f"no such event log: {path}")
    lines: Iterable[LogLine] = read_jsonl(path)
    if limit is not None:
        lines = _first_events(lines, limit)
    source = {"kind": "jsonl", "path": str(path), "sha256": file_sha256(path), "limit": limit}
    return from_records(lines, limits, source)


def _first_events(lines: Iterable[LogLine], limit: int) -> Iterable[LogLine]:
    """All catalog lines, but only the first `limit` other lines."""
    n = 0
    for line in lines:
        if line.record is not None and line.record.get("type") == "item":
            yield line
        elif n < limit:
            n += 1
            yield line


def load_movielens(
    path: Path, limits: Limits = DEFAULT_LIMITS, limit: int | None = None, profiles: bool = False
) -> BacktestData:
    """MovieLens 100K as the backtest's data. `profiles` also hands the models the users'
    demographics (u.user) for cold start: side information no event contract carries, so the
    live worker never has it, and a backtest that uses it measures something the worker cannot
    serve (off by default)."""
    folder = movielens_dir(path)
    files = {
        name: file_sha256(folder / name)
        for name in ("u.data", "u.item", "u.user")
        if (folder / name).is_file()
    }
    users = movielens_users(folder) if profiles else {}
    records = [*movielens_items(folder), *movielens_ratings(folder, limit)]
    source = {"kind": "movielens", "path": str(path), "sha256": files, "limit": limit, "profiles": profiles}
    return from_records(records, limits, source, [UserProfile(user_id=u, attrs=a) for u, a in users.items()])


def load_lastfm(path: Path, limits: Limits = DEFAULT_LIMITS, limit: int | None = None) -> BacktestData:
    """Last.fm-2k: first taggings as clicks, tag assignments as searches, artist names as item text."""
    folder = lastfm_dir(path)
    files = {name: file_sha256(folder / name) for name in ("events.csv", "tag_events.csv", "artists.csv")}
    src = lastfm_source(folder, limit)
    source = {
        "kind": "lastfm",
        "path": str(path),
        "sha256": files,
        "limit": limit,
        "unnamed_items": src.unnamed_items,
        "items_not_in_artists": src.items_not_in_artists,
    }
    return from_records(src.records, limits, source)
