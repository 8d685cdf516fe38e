"""Event sources as plain records: JSONL logs, MovieLens 100K, Last.fm-2k, a synthetic generator.

A record is the JSON object of DESIGN.md plus its `type`; `produce`, `replay`
and `backtest` all read through here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ML_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


class SourceError(ValueError):
    """A source that cannot be read (missing file, wrong format): a user mistake."""


@dataclass(frozen=True, slots=True)
class LogLine:
    lineno: int
    raw: str
    record: dict[str, Any] | None  # None when the line is not a JSON object


def read_jsonl(path: Path) -> Iterator[LogLine]:
    if not path.is_file():
        raise SourceError(f"no such event log: {path}")
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            raw = line.rstrip("\n")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                record = None
            yield LogLine(lineno, raw, record if isinstance(record, dict) else None)


def movielens_dir(path: Path) -> Path:
    if not (path / "u.data").is_file() or not (path / "u.item").is_file():
        raise SourceError(f"{path} is not a MovieLens 100K folder (u.data and u.item expected)")
    return path


def _decode_line(raw: bytes) -> str:
    # The original files are Latin-1; some copies were re-encoded as UTF-8.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def movielens_items(path: Path) -> list[dict[str, Any]]:
    items = []
    with (movielens_dir(path) / "u.item").open("rb") as fh:
        for raw in fh:
            parts = _decode_line(raw).rstrip("\n").split("|")
            if len(parts) < 24:
                continue
            genres = [g for g, flag in zip(ML_GENRES, parts[5:24], strict=True) if flag == "1"]
            items.append(
                {
                    "type": "item",
                    "item_id": parts[0],
                    "text": parts[1],
                    "attrs": {"genres": genres, "release_date": parts[2]},
                }
            )
    return items


def movielens_ratings(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rating events in event-time order (ties broken by user, then item, for determinism)."""
    rows = []
    with (movielens_dir(path) / "u.data").open() as fh:
        for line in fh:
            user, item, rating, ts = line.split()
            rows.append((int(ts), int(user), int(item), float(rating)))
    rows.sort()
    if limit is not None:
        rows = rows[:limit]
    return [
        {
            "type": "rating",
            "event_id": f"ml-{u}-{i}",
            "user_id": str(u),
            "item_id": str(i),
            "rating": r,
            "ts": ts * 1000,
        }
        for ts, u, i, r in rows
    ]


def movielens_users(path: Path) -> dict[str, dict[str, Any]]:
    users: dict[str, dict[str, Any]] = {}
    file = movielens_dir(path) / "u.user"
    if not file.is_file():
        return users
    with file.open(encoding="latin-1") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("|")
            # Some copies carry a header line ("id|age|..."); data rows start with a numeric id.
            if len(parts) < 4 or not parts[0].isdigit() or not parts[1].isdigit():
                continue
            uid, age, gender, occupation = parts[:4]
            users[uid] = {"age": int(age), "gender": gender, "occupation": occupation}
    return users


LASTFM_FILES = {
    "events.csv": ["user_id", "item_id", "timestamp", "weight"],
    "tag_events.csv": ["user_id", "item_id", "tag", "timestamp"],
    "artists.csv": ["item_id", "name"],
}


def lastfm_dir(path: Path) -> Path:
    missing = [name for name in LASTFM_FILES if not (path / name).is_file()]
    if missing:
        raise SourceError(
            f"{path} is not a Last.fm-2k folder ({', '.join(missing)} missing; "
            "events.csv, tag_events.csv and artists.csv expected)"
        )
    return path


def _lastfm_rows(path: Path, name: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of one CSV file, after checking its header."""
    with (path / name).open(newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        if header != LASTFM_FILES[name]:
            raise SourceError(
                f"{path / name}: header {','.join(header)!r}, expected {','.join(LASTFM_FILES[name])!r}"
            )
        for row in reader:
            yield reader.line_num, row


def _epoch_ms(value: str | None) -> int | str | None:
    """Epoch seconds -> milliseconds; anything else is passed on for the schema to reject with a reason."""
    text = (value or "").strip()
    return int(text) * 1000 if text.isdigit() else value


@dataclass(slots=True)
class LastfmSource:
    records: list[dict[str, Any]]  # catalog first, then events in event-time order
    unnamed_items: int  # catalog entries with no name (empty text)
    items_not_in_artists: int  # artists named by events but absent from artists.csv (empty text)


def lastfm_source(path: Path, limit: int | None = None) -> LastfmSource:
    """Last.fm-2k (HetRec 2011) as records of the JSONL contract.

    - every row of `events.csv` (a user's first tagging of an artist) is a click;
    - every row of `tag_events.csv` is a search: query = the tag, clicked item = the artist;
    - the catalog is the artists that events name, text = the artist name (`artists.csv`);
      an artist with no name, or missing from `artists.csv`, gets empty text and is counted.

    Events are ordered by time, then user, artist, click before search, tag: timestamps are
    month-level, and the backtest never rewards order inside a tie (docs/backtest.md).
    Event ids come from the content (user, artist, time, tag), so a repeated row is a
    duplicate the backtest applies once, as the worker does.
    """
    folder = lastfm_dir(path)
    rows: list[tuple[Any, ...]] = []
    for _n, r in _lastfm_rows(folder, "events.csv"):
        rows.append((_epoch_ms(r["timestamp"]), r["user_id"], r["item_id"], 0, "", r["timestamp"]))
    for _n, r in _lastfm_rows(folder, "tag_events.csv"):
        rows.append(
            (_epoch_ms(r["timestamp"]), r["user_id"], r["item_id"], 1, r["tag"] or "", r["timestamp"])
        )
    # Unparseable times sort first (and are rejected by the schema with their reason).
    rows.sort(key=lambda r: (r[0] if isinstance(r[0], int) else -1, r[1] or "", r[2] or "", r[3], r[4]))
    if limit is not None:
        rows = rows[:limit]
    names = {r["item_id"]: r["name"] or "" for _n, r in _lastfm_rows(folder, "artists.csv")}
    catalog: dict[str, str] = {}
    events: list[dict[str, Any]] = []
    for ts, user, item, is_search, tag, raw_ts in rows:
        if item and item not in catalog:
            catalog[item] = names.get(item, "")
        base = {"user_id": user, "ts": ts}
        if is_search:
            digest = hashlib.sha1(tag.encode("utf-8")).hexdigest()[:12]
            events.append(
                {
                    "type": "search",
                    "event_id": f"lfm-s-{user}-{item}-{raw_ts}-{digest}",
                    **base,
                    "query": tag,
                    "clicked_item_id": item,
                }
            )
        else:
            events.append(
                {"type": "click", "event_id": f"lfm-c-{user}-{item}-{raw_ts}", **base, "item_id": item}
            )
    items = [{"type": "item", "item_id": i, "text": t} for i, t in catalog.items()]
    return LastfmSource(
        records=[*items, *events],
        unnamed_items=sum(1 for i, t in catalog.items() if i in names and not t.strip()),
        items_not_in_artists=sum(1 for i in catalog if i not in names),
    )


TOPIC_WORDS = {
    "space": ["galaxy", "rocket", "astronaut", "planet", "orbit", "nebula", "alien"],
    "cooking": ["recipe", "pasta", "baking", "spice", "kitchen", "chef", "soup"],
    "football": ["goal", "striker", "league", "match", "penalty", "stadium", "coach"],
    "finance": ["stocks", "bonds", "inflation", "bank", "dividend", "market", "budget"],
    "gardening": ["roses", "compost", "seeds", "tomatoes", "pruning", "soil", "garden"],
    "music": ["guitar", "concert", "album", "piano", "melody", "drummer", "band"],
}


def synthetic_log(
    n_users: int = 50,
    n_events: int = 1000,
    items_per_topic: int = 20,
    switch_at: float | None = None,
    seed: int = 0,
    start_ms: int = 1_700_000_000_000,
) -> list[dict[str, Any]]:
    """Catalog + events where each user likes one topic, optionally switching at a known moment.

    With `switch_at` in (0, 1), every user moves to another topic after that
    fraction of the events; backtests use it to check that interests are tracked.
    """
    rng = random.Random(seed)
    topics = list(TOPIC_WORDS)
    records: list[dict[str, Any]] = []
    by_topic: dict[str, list[str]] = {}
    for t in topics:
        for k in range(items_per_topic):
            words = rng.sample(TOPIC_WORDS[t], 3)
            item_id = f"{t}-{k}"
            by_topic.setdefault(t, []).append(item_id)
            records.append(
                {"type": "item", "item_id": item_id, "text": f"{' '.join(words)} {t}", "attrs": {"topic": t}}
            )
    users = [f"user-{u}" for u in range(n_users)]
    first = {u: rng.choice(topics) for u in users}
    second = {u: rng.choice([t for t in topics if t != first[u]]) for u in users}
    switch_index = int(n_events * switch_at) if switch_at else n_events + 1
    for n in range(n_events):
        user = users[n % n_users] if n < n_users else rng.choice(users)
        topic = first[user] if n < switch_index else second[user]
        item = rng.choice(by_topic[topic])
        ts = start_ms + n * 60_000
        kind = rng.choice(["click", "click", "rating", "search"])
        base = {"event_id": f"syn-{seed}-{n}", "user_id": user, "ts": ts}
        if kind == "click":
            others = [i for t in topics if t != topic for i in by_topic[t]]
            records.append(
                {
                    "type": "click",
                    **base,
                    "item_id": item,
                    "impressions": rng.sample(others, 3),
                    "dwell_ms": rng.randint(500, 60000),
                }
            )
        elif kind == "rating":
            records.append({"type": "rating", **base, "item_id": item, "rating": rng.choice([4.0, 4.5, 5.0])})
        else:
            records.append(
                {
                    "type": "search",
                    **base,
                    "query": f"{rng.choice(TOPIC_WORDS[topic])} {topic}",
                    "clicked_item_id": item,
                }
            )
    return records
