"""The event contract of DESIGN.md: raw JSON -> validated `Event` / `Item`, or a reason.

Every rule gives a one-line, human-readable reason; the worker puts that reason
on the dead-letter topic beside the original bytes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from models.events import Event, Item

RECORD_TYPES = ("click", "search", "rating", "item")
# Epoch milliseconds beyond year 9999 cannot be a real event time.
_MAX_EPOCH_MS = 253402300799999


class InvalidRecord(ValueError):
    """A record that breaks the event contract; `reason` says which rule."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that failed validation: where it was (line number, topic/partition/offset,
    or record index) and why."""

    where: str
    reason: str


# What validating one record gives.
Parsed = Event | Item | Rejected


@dataclass(frozen=True, slots=True)
class Limits:
    max_id_len: int = 128
    max_query_len: int = 1024
    rating_min: float = 0.5
    rating_max: float = 5.0


DEFAULT_LIMITS = Limits()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A JSON number that is finite as a float (an integer beyond float range is not)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _id(record: dict[str, Any], field: str, limits: Limits, required: bool = True) -> str | None:
    value = record.get(field)
    if value is None:
        if required:
            raise InvalidRecord(f"missing required field {field!r}")
        return None
    if not isinstance(value, str):
        raise InvalidRecord(f"{field} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRecord(f"{field} must not be empty")
    if len(value) > limits.max_id_len:
        raise InvalidRecord(f"{field} longer than {limits.max_id_len} characters ({len(value)})")
    return value


def parse_ts(value: Any) -> float:
    """RFC 3339 string or epoch milliseconds -> epoch seconds."""
    if value is None:
        raise InvalidRecord("missing required field 'ts'")
    if _is_number(value):
        if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
            raise InvalidRecord(f"ts as a number must be whole epoch milliseconds, got {value!r}")
        ms = int(value)
        if not 0 <= ms <= _MAX_EPOCH_MS:
            raise InvalidRecord(f"ts {ms} is not a plausible epoch-milliseconds time")
        return ms / 1000.0
    if isinstance(value, str):
        text = value.strip()
        # RFC 3339 requires the 'T' (or space) separator, a full time and an offset.
        if len(text) < 19 or text[10] not in "Tt ":
            raise InvalidRecord(f"ts {value!r} is not an RFC 3339 date-time")
        try:
            parsed = datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            raise InvalidRecord(f"ts {value!r} is not an RFC 3339 date-time") from None
        if parsed.tzinfo is None:
            raise InvalidRecord(f"ts {value!r} has no UTC offset (RFC 3339 requires one)")
        seconds = parsed.timestamp()
        # The same range as epoch milliseconds: "0001-01-01T00:00:00+14:00" parses, but lies
        # before year 1 in UTC, where Postgres' and Python's timestamps end (found by fuzzing).
        if not 0 <= seconds * 1000 <= _MAX_EPOCH_MS:
            raise InvalidRecord(f"ts {value!r} is not a plausible time (before 1970 or too far ahead)")
        return seconds
    raise InvalidRecord(f"ts must be an RFC 3339 string or epoch milliseconds, got {type(value).__name__}")


def _finite_vector(value: Any, field: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidRecord(f"{field} must be a non-empty list of numbers")
    if not all(_is_finite(v) for v in value):
        raise InvalidRecord(f"{field} must contain only finite numbers")
    return tuple(float(v) for v in value)


# Every character a text field may not hold, in one C-level scan (a per-character Python loop
# was most of the validator's time on ordinary records).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


# In JSON text, the only other spellings of those characters: escapes (raw control characters
# are invalid JSON, and UTF-8 bytes cannot hold a surrogate).
_ESCAPED_UNSTORABLE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_ESCAPED_UNSTORABLE_BYTES = re.compile(_ESCAPED_UNSTORABLE.pattern.encode())


def _may_hold_unstorable(raw: bytes | str | dict[str, Any]) -> bool:
    """Whether a record's decoded strings need the full text check: raw JSON without an escape
    (or, as text, a character) that spells NUL or a surrogate cannot produce one."""
    if isinstance(raw, bytes):
        return _ESCAPED_UNSTORABLE_BYTES.search(raw) is not None
    if isinstance(raw, str):
        return _UNSTORABLE.search(raw) is not None or _ESCAPED_UNSTORABLE.search(raw) is not None
    return True


def _bad_text(value: str) -> str | None:
    if _UNSTORABLE.search(value) is None:
        return None
    if "\x00" in value:
        return "a NUL character (U+0000), which text fields may not"
    # JSON's \ud800 escape without its pair: not Unicode, so neither UTF-8 (Postgres, the
    # dead-letter topic) nor the tokenizer can take it.
    return "an unpaired surrogate (U+D800 to U+DFFF), which is not valid Unicode"


def _text_problem(value: Any, path: str) -> tuple[str, str] | None:
    """Where in a decoded JSON value a string (or an object key) cannot be stored as text, and why."""
    if isinstance(value, str):
        problem = _bad_text(value)
        return (path, problem) if problem else None
    if isinstance(value, dict):
        for key, inner in value.items():
            if (problem := _bad_text(key)) is not None:
                return (f"{path}.{key!r}" if path else repr(key), problem)
            if (found := _text_problem(inner, f"{path}.{key}" if path else key)) is not None:
                return found
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            if (found := _text_problem(inner, f"{path}[{i}]")) is not None:
                return found
    return None


def _reject_bad_text(record: dict[str, Any]) -> None:
    # Postgres text cannot hold U+0000 (nor anything that is not Unicode): without this rule
    # such a record failed its whole batch at commit and was found by bisection, after model
    # work for every record in it.
    if (found := _text_problem(record, "")) is not None:
        raise InvalidRecord(f"{found[0]} contains {found[1]}")


def validate_item(
    record: dict[str, Any], limits: Limits = DEFAULT_LIMITS, *, check_text: bool = True
) -> Item:
    if check_text:
        _reject_bad_text(record)
    item_id = _id(record, "item_id", limits)
    assert item_id is not None
    text = record.get("text")
    if not isinstance(text, str):
        raise InvalidRecord("missing required field 'text'" if text is None else "text must be a string")
    attrs = record.get("attrs", {})
    if attrs is None:
        attrs = {}
    if not isinstance(attrs, dict):
        raise InvalidRecord("attrs must be a JSON object")
    embedding = record.get("embedding")
    return Item(
        item_id=item_id,
        text=text,
        attrs=attrs,
        embedding=None if embedding is None else _finite_vector(embedding, "embedding"),
    )


def validate_event(
    record: dict[str, Any], kind: str, limits: Limits = DEFAULT_LIMITS, *, check_text: bool = True
) -> Event:
    if check_text:
        _reject_bad_text(record)
    event_id = _id(record, "event_id", limits)
    user_id = _id(record, "user_id", limits)
    assert event_id is not None and user_id is not None
    ts = parse_ts(record.get("ts"))
    fields: dict[str, Any] = {}
    if kind == "click":
        fields["item_id"] = _id(record, "item_id", limits)
        impressions = record.get("impressions")
        if impressions is not None:
            if not isinstance(impressions, list) or not all(
                isinstance(i, str) and 0 < len(i) <= limits.max_id_len for i in impressions
            ):
                raise InvalidRecord("impressions must be a list of item_id strings")
            fields["impressions"] = tuple(impressions)
        dwell = record.get("dwell_ms")
        if dwell is not None:
            if not isinstance(dwell, int) or isinstance(dwell, bool) or dwell < 0:
                raise InvalidRecord(f"dwell_ms must be an integer >= 0, got {dwell!r}")
            fields["dwell_ms"] = dwell
    elif kind == "search":
        query = record.get("query")
        if query is None:
            raise InvalidRecord("missing required field 'query'")
        if not isinstance(query, str) or not query.strip():
            raise InvalidRecord("query must be a non-empty string")
        if len(query) > limits.max_query_len:
            raise InvalidRecord(f"query longer than {limits.max_query_len} characters ({len(query)})")
        fields["query"] = query
        fields["clicked_item_id"] = _id(record, "clicked_item_id", limits, required=False)
    elif kind == "rating":
        fields["item_id"] = _id(record, "item_id", limits)
        rating = record.get("rating")
        if rating is None:
            raise InvalidRecord("missing required field 'rating'")
        if not _is_finite(rating):
            raise InvalidRecord(f"rating must be a number, got {rating!r}")
        if not limits.rating_min <= rating <= limits.rating_max:
            raise InvalidRecord(f"rating {rating} out of range [{limits.rating_min}, {limits.rating_max}]")
        fields["rating"] = float(rating)
    else:
        raise InvalidRecord(f"unknown event type {kind!r}")
    return Event(event_id=event_id, user_id=user_id, ts=ts, kind=kind, **fields)  # type: ignore[arg-type]


def decode_json(raw: bytes | str) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRecord(f"invalid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise InvalidRecord(f"record must be a JSON object, got {type(record).__name__}")
    return record


def parse_topic_record(raw: bytes | str, topic_kind: str, limits: Limits = DEFAULT_LIMITS) -> Event | Item:
    """A record read from a topic: the topic says what it is; a `type` field must agree."""
    record = decode_json(raw)
    declared = record.get("type")
    if declared is not None and declared != topic_kind:
        raise InvalidRecord(f"type {declared!r} disagrees with the topic, which carries {topic_kind!r}")
    check_text = _may_hold_unstorable(raw)
    if topic_kind == "item":
        return validate_item(record, limits, check_text=check_text)
    return validate_event(record, topic_kind, limits, check_text=check_text)


def parse_log_record(raw: bytes | str | dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Event | Item:
    """A record from a JSONL event log: it must carry its `type`."""
    record = raw if isinstance(raw, dict) else decode_json(raw)
    kind = record.get("type")
    if kind is None:
        raise InvalidRecord("missing required field 'type' (click, search, rating or item)")
    if kind not in RECORD_TYPES:
        raise InvalidRecord(f"unknown type {kind!r}; expected one of {', '.join(RECORD_TYPES)}")
    check_text = _may_hold_unstorable(raw)
    if kind == "item":
        return validate_item(record, limits, check_text=check_text)
    return validate_event(record, kind, limits, check_text=check_text)
