"""The event contract of DESIGN.md, rule by rule."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from models.events import Event, Item
from stream.schema import InvalidRecord, Limits, parse_log_record, parse_topic_record, parse_ts

BASE = {"event_id": "e1", "user_id": "u1", "ts": 1_700_000_000_000}
CLICK = {**BASE, "item_id": "i1"}
SEARCH = {**BASE, "query": "space opera"}
RATING = {**BASE, "item_id": "i1", "rating": 4.5}
ITEM = {"item_id": "i1", "text": "Star Wars (1977)"}


def raw(record: object) -> bytes:
    return json.dumps(record).encode()


VALID = [
    ("click", CLICK),
    ("click", {**CLICK, "impressions": ["i2", "i3"], "dwell_ms": 0}),
    ("click", {**CLICK, "type": "click"}),
    ("search", SEARCH),
    ("search", {**SEARCH, "clicked_item_id": "i9"}),
    ("search", {**SEARCH, "query": "q" * 1024}),
    ("rating", RATING),
    ("rating", {**RATING, "rating": 0.5}),
    ("rating", {**RATING, "rating": 5}),
    ("rating", {**RATING, "ts": "2023-11-14T22:13:20Z"}),
    ("rating", {**RATING, "ts": "2023-11-14T23:13:20.5+01:00"}),
    ("click", {**CLICK, "event_id": "e" * 128, "user_id": "u" * 128}),
    ("item", ITEM),
    ("item", {**ITEM, "attrs": {"genres": ["Sci-Fi"]}, "embedding": [0.1, -2, 3]}),
]


@pytest.mark.parametrize(("kind", "record"), VALID)
def test_valid_records_pass(kind: str, record: dict) -> None:
    parsed = parse_topic_record(raw(record), kind)
    assert isinstance(parsed, Item if kind == "item" else Event)


INVALID = [
    # (topic kind, record or raw bytes, words expected in the reason)
    ("click", b"{not json", "invalid JSON"),
    ("click", b"\xff\xfe", "invalid JSON"),
    ("click", b"[1, 2]", "JSON object"),
    ("click", {k: v for k, v in CLICK.items() if k != "event_id"}, "event_id"),
    ("click", {k: v for k, v in CLICK.items() if k != "user_id"}, "user_id"),
    ("click", {k: v for k, v in CLICK.items() if k != "ts"}, "ts"),
    ("click", {**CLICK, "user_id": ""}, "user_id must not be empty"),
    ("click", {**CLICK, "user_id": 42}, "user_id must be a string"),
    ("click", {**CLICK, "user_id": "u" * 129}, "longer than 128"),
    ("click", {**CLICK, "event_id": "e" * 129}, "longer than 128"),
    ("click", {k: v for k, v in CLICK.items() if k != "item_id"}, "item_id"),
    ("click", {**CLICK, "impressions": "i2"}, "impressions"),
    ("click", {**CLICK, "impressions": ["i2", 3]}, "impressions"),
    ("click", {**CLICK, "dwell_ms": -1}, "dwell_ms"),
    ("click", {**CLICK, "dwell_ms": 1.5}, "dwell_ms"),
    ("click", {**CLICK, "dwell_ms": True}, "dwell_ms"),
    ("click", {**CLICK, "type": "rating"}, "disagrees with the topic"),
    ("search", {k: v for k, v in SEARCH.items() if k != "query"}, "query"),
    ("search", {**SEARCH, "query": "   "}, "non-empty"),
    ("search", {**SEARCH, "query": "q" * 1025}, "longer than 1024"),
    ("search", {**SEARCH, "clicked_item_id": 7}, "clicked_item_id"),
    ("rating", {k: v for k, v in RATING.items() if k != "rating"}, "rating"),
    ("rating", {**RATING, "rating": 5.5}, "out of range"),
    ("rating", {**RATING, "rating": 0.4}, "out of range"),
    ("rating", {**RATING, "rating": "5"}, "must be a number"),
    ("rating", {**RATING, "rating": True}, "must be a number"),
    ("rating", {k: v for k, v in RATING.items() if k != "item_id"}, "item_id"),
    ("rating", {**RATING, "ts": "yesterday"}, "RFC 3339"),
    ("rating", {**RATING, "ts": "2023-11-14"}, "RFC 3339"),
    ("rating", {**RATING, "ts": "2023-11-14T22:13:20"}, "offset"),
    ("rating", {**RATING, "ts": -5}, "plausible"),
    ("rating", {**RATING, "ts": "0001-01-01T00:00:00+14:00"}, "plausible"),
    ("rating", {**RATING, "ts": 1.7e12 + 0.5}, "whole epoch milliseconds"),
    ("rating", {**RATING, "ts": [1]}, "ts must be"),
    ("rating", {**RATING, "ts": True}, "ts must be"),
    ("item", {"text": "x"}, "item_id"),
    ("item", {"item_id": "i1"}, "text"),
    ("item", {**ITEM, "attrs": [1]}, "attrs"),
    ("item", {**ITEM, "embedding": []}, "embedding"),
    ("item", {**ITEM, "embedding": [1, "x"]}, "embedding"),
    ("item", {**ITEM, "type": "click"}, "disagrees"),
]


@pytest.mark.parametrize(("kind", "record", "reason"), INVALID)
def test_invalid_records_give_a_reason(kind: str, record: object, reason: str) -> None:
    data = record if isinstance(record, bytes) else raw(record)
    with pytest.raises(InvalidRecord) as info:
        parse_topic_record(data, kind)
    assert reason in info.value.reason


def test_rating_scale_is_configurable() -> None:
    limits = Limits(rating_min=1, rating_max=10)
    assert parse_topic_record(raw({**RATING, "rating": 9}), "rating", limits).rating == 9
    with pytest.raises(InvalidRecord):
        parse_topic_record(raw({**RATING, "rating": 0.5}), "rating", limits)


def test_both_ts_forms_mean_the_same_moment() -> None:
    assert parse_ts(1_700_000_000_000) == parse_ts("2023-11-14T22:13:20Z") == 1_700_000_000.0
    assert parse_ts("2023-11-14T23:13:20+01:00") == 1_700_000_000.0


def test_log_records_must_carry_a_known_type() -> None:
    assert isinstance(parse_log_record({**CLICK, "type": "click"}), Event)
    assert isinstance(parse_log_record({**ITEM, "type": "item"}), Item)
    with pytest.raises(InvalidRecord, match="missing required field 'type'"):
        parse_log_record(CLICK)
    with pytest.raises(InvalidRecord, match="unknown type"):
        parse_log_record({**CLICK, "type": "purchase"})


def test_parsed_event_fields() -> None:
    event = parse_topic_record(raw({**CLICK, "impressions": ["a", "b"], "dwell_ms": 1200}), "click")
    assert isinstance(event, Event)
    assert (event.kind, event.item_id, event.impressions, event.dwell_ms) == ("click", "i1", ("a", "b"), 1200)
    search = parse_topic_record(raw({**SEARCH, "clicked_item_id": "i9"}), "search")
    assert isinstance(search, Event) and search.target_item == "i9"


@pytest.mark.parametrize(
    ("kind", "record", "where"),
    [
        ("click", {**CLICK, "event_id": "e\u00001"}, "event_id"),
        ("click", {**CLICK, "user_id": "user-\u0000"}, "user_id"),
        ("click", {**CLICK, "item_id": "\u0000"}, "item_id"),
        ("click", {**CLICK, "impressions": ["i2", "i\u00003"]}, "impressions[1]"),
        ("search", {**SEARCH, "query": "space\u0000opera"}, "query"),
        ("search", {**SEARCH, "clicked_item_id": "i\u00009"}, "clicked_item_id"),
        ("rating", {**RATING, "item_id": "i1\u0000"}, "item_id"),
        ("item", {**ITEM, "text": "Star\u0000Wars"}, "text"),
        ("item", {**ITEM, "attrs": {"genres": ["Sci-Fi", "Act\u0000ion"]}}, "attrs.genres[1]"),
        ("item", {**ITEM, "attrs": {"year": {"label": "19\u000077"}}}, "attrs.year.label"),
        ("item", {**ITEM, "attrs": {"ge\u0000nre": "x"}}, "attrs.'ge\\x00nre'"),
    ],
)
def test_a_nul_in_any_text_field_has_its_own_reason(kind: str, record: dict, where: str) -> None:
    """Postgres text cannot hold U+0000: the validator names the field, before any model work."""
    with pytest.raises(InvalidRecord) as exc:
        parse_topic_record(raw(record), kind)
    assert exc.value.reason == f"{where} contains a NUL character (U+0000), which text fields may not"
    with pytest.raises(InvalidRecord, match="NUL character"):
        parse_log_record({**record, "type": kind})


def test_a_nul_escape_in_raw_bytes_is_rejected_but_other_control_characters_pass() -> None:
    value = b'{"event_id": "e1", "user_id": "u\\u0000", "item_id": "i1", "ts": 1}'
    with pytest.raises(InvalidRecord, match=r"^user_id contains a NUL"):
        parse_topic_record(value, "click")
    ok = parse_topic_record(raw({**SEARCH, "query": "tab\there\u0001"}), "search")
    assert isinstance(ok, Event) and ok.query == "tab\there\u0001"


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        (b'{"event_id": "e1", "user_id": "u\\uDBFF", "item_id": "i1", "ts": 1}', False),
        (b'{"event_id": "e1", "user_id": "u\\uD83D\\uDE00", "item_id": "i1", "ts": 1}', True),
        (b'{"event_id": "e1", "user_id": "u\\\\u0000", "item_id": "i1", "ts": 1}', True),
        (b'{"event_id": "e1", "user_id": "h\\u00e9\\u2603", "item_id": "i1", "ts": 1}', True),
    ],
)
def test_raw_bytes_are_screened_for_escapes_without_losing_a_case(value: bytes, accepted: bool) -> None:
    """The topic path looks into decoded strings only when the bytes hold an escape that could
    spell NUL or a surrogate; the result is what the full check on the decoded record says."""
    full = outcome_of(lambda: parse_log_record({**json.loads(value), "type": "click"}))
    assert outcome_of(lambda: parse_topic_record(value, "click")) == full
    assert (full == "ok") is accepted


def outcome_of(parse: Callable[[], object]) -> str:
    try:
        parse()
    except InvalidRecord as exc:
        return exc.reason
    return "ok"


@pytest.mark.parametrize(
    ("kind", "value", "where"),
    [
        ("click", b'{"event_id": "e1", "user_id": "u\\ud800", "item_id": "i1", "ts": 1}', "user_id"),
        ("item", b'{"item_id": "i1", "text": "t", "attrs": {"a": ["\\udfff"]}}', "attrs.a[0]"),
    ],
)
def test_an_unpaired_surrogate_is_rejected_a_paired_one_is_a_character(
    kind: str, value: bytes, where: str
) -> None:
    with pytest.raises(InvalidRecord) as exc:
        parse_topic_record(value, kind)
    assert (
        exc.value.reason
        == f"{where} contains an unpaired surrogate (U+D800 to U+DFFF), which is not valid Unicode"
    )
    ok = parse_topic_record(
        b'{"event_id": "e1", "user_id": "u\\ud83d\\ude00", "item_id": "i1", "ts": 1}', "click"
    )
    assert isinstance(ok, Event) and ok.user_id == "u\U0001f600"
