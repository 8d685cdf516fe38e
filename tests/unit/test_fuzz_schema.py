"""Fuzzing the validator: whatever arrives, it ends valid or rejected with a reason, never an exception.

Arbitrary bytes, arbitrary JSON, valid records with fields dropped or set to boundary
values or arbitrary JSON, and valid records (which must pass). What is accepted must
keep the contract (DESIGN.md): bounded ids, finite times and ratings in range.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.events import Event, Item
from stream.schema import DEFAULT_LIMITS, InvalidRecord, parse_log_record, parse_topic_record
from tests.fuzz_strategies import KINDS, encode, fuzz_settings, json_values, mutated_record, valid_record

# Counted in the README's reliability section. 200 took 7-27 s per test beside two CPU
# burners on a shared 2-core machine.
FUZZ = fuzz_settings(200)


def outcome(raw: bytes | str, kind: str | None) -> Event | Item | str:
    """The parsed record, or the reason it was rejected. Any other exception fails the test."""
    try:
        return parse_log_record(raw) if kind is None else parse_topic_record(raw, kind)
    except InvalidRecord as exc:
        assert isinstance(exc.reason, str) and exc.reason.strip(), repr(exc)
        return exc.reason


def storable(value: Any) -> bool:
    """No text Postgres cannot hold (NUL, lone surrogates), anywhere in the parsed value."""
    if isinstance(value, str):
        return "\x00" not in value and not any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return all(storable(k) and storable(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(storable(v) for v in value)
    return True


def check_contract(parsed: Event | Item) -> None:
    assert storable([getattr(parsed, f.name) for f in dataclasses.fields(parsed)]), parsed

    def ok_id(value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip()) and len(value) <= DEFAULT_LIMITS.max_id_len

    if isinstance(parsed, Item):
        assert ok_id(parsed.item_id) and isinstance(parsed.text, str) and isinstance(parsed.attrs, dict)
        assert parsed.embedding is None or (
            parsed.embedding and all(math.isfinite(v) for v in parsed.embedding)
        )
        return
    assert ok_id(parsed.event_id) and ok_id(parsed.user_id)
    assert isinstance(parsed.ts, float) and math.isfinite(parsed.ts)
    assert parsed.kind in KINDS
    if parsed.kind in ("click", "rating"):
        assert ok_id(parsed.item_id)
    if parsed.kind == "rating":
        assert parsed.rating is not None
        assert DEFAULT_LIMITS.rating_min <= parsed.rating <= DEFAULT_LIMITS.rating_max
    if parsed.kind == "search":
        assert isinstance(parsed.query, str) and parsed.query.strip()
        assert len(parsed.query) <= DEFAULT_LIMITS.max_query_len
    if parsed.dwell_ms is not None:
        assert isinstance(parsed.dwell_ms, int) and parsed.dwell_ms >= 0
    assert all(ok_id(i) for i in parsed.impressions or ())


def everywhere(raw: bytes) -> None:
    """On every topic kind and as a log line."""
    for kind in (*KINDS, None):
        result = outcome(raw, kind)
        if not isinstance(result, str):
            check_contract(result)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(raw: bytes) -> None:
    everywhere(raw)


@FUZZ
@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    everywhere(encode(value))


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "event_id",
                "user_id",
                "ts",
                "item_id",
                "rating",
                "query",
                "type",
                "text",
                "impressions",
                "dwell_ms",
                "embedding",
            ]
        ),
        json_values,
    )
)
def test_arbitrary_json_objects_with_the_contract_fields(value: dict[str, Any]) -> None:
    everywhere(encode(value))


@FUZZ
@given(mutated_record())
def test_boundary_values(kind_and_record: tuple[str, dict[str, Any]]) -> None:
    kind, rec = kind_and_record
    everywhere(encode(rec))
    result = outcome(encode(rec), kind)
    if not isinstance(result, str):
        check_contract(result)


@FUZZ
@given(valid_record())
def test_valid_records_pass(rec: dict[str, Any]) -> None:
    kind = rec.get("type") or (
        "item" if "text" in rec else "rating" if "rating" in rec else "search" if "query" in rec else "click"
    )
    result = outcome(encode(rec), kind)
    assert not isinstance(result, str), f"valid {kind} rejected: {result}"
    check_contract(result)
    assert outcome(encode({**rec, "type": kind}), None) == result  # the same as a log line


@pytest.mark.parametrize("kind", KINDS)
def test_valid_of_each_kind_pass(kind: str) -> None:
    @fuzz_settings(100)
    @given(valid_record(kind))
    def check(rec: dict[str, Any]) -> None:
        result = outcome(encode(rec), kind)
        assert not isinstance(result, str), f"valid {kind} rejected: {result}"

    check()
