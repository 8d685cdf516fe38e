"""Hypothesis strategies for event records: valid ones, boundary values, and anything at all.

Shared by the validator fuzz test (unit) and the processor fuzz test (real Postgres).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from stream.schema import DEFAULT_LIMITS


def examples(n: int) -> int:
    """`n` examples, times FUZZ_SCALE (e.g. FUZZ_SCALE=20 for a long search on a quiet machine)."""
    return max(1, round(n * float(os.environ.get("FUZZ_SCALE", "1"))))


def fuzz_settings(n: int) -> settings:
    """`examples(n)` per test, no per-example deadline (a loaded machine); in CI the same examples
    on every run, so a red build means a change, not a newly drawn input."""
    return settings(
        max_examples=examples(n),
        deadline=None,
        derandomize=bool(os.environ.get("CI")),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


MAX_EPOCH_MS = 253402300799999  # year 9999, the validator's bound
KINDS = ("click", "search", "rating", "item")

# Text Postgres can store: no NUL, no lone surrogates (JSON can carry both).
clean_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"))
# Anything a JSON string can hold.
any_text = st.text(st.characters(codec=None)) | st.sampled_from(["", " ", "\x00", "a\x00b", "\ud800", "\t\n"])


def ident(text: st.SearchStrategy[str] = clean_text) -> st.SearchStrategy[str]:
    """A valid id: 1..max_id_len characters, not blank."""
    return text.filter(lambda s: s.strip()).map(lambda s: s[: DEFAULT_LIMITS.max_id_len]).filter(
        lambda s: s.strip()
    ) | st.sampled_from(["a", "x" * DEFAULT_LIMITS.max_id_len, "é" * DEFAULT_LIMITS.max_id_len])


boundary_ids = st.sampled_from(
    ["", " ", "\t", "a", "x" * 127, "x" * 128, "x" * 129, "ü" * 128, "ü" * 129, "\x00", "a\x00"]
)

valid_ts = st.one_of(
    st.integers(0, MAX_EPOCH_MS),
    st.sampled_from([0, 1, MAX_EPOCH_MS, 1_700_000_000_000]),
    st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
        ),
    ).map(lambda d: d.isoformat()),
)
boundary_ts = st.sampled_from(
    [
        -1,
        MAX_EPOCH_MS + 1,
        10**30,
        -(10**30),
        1.5,
        1e300,
        float("nan"),
        float("inf"),
        True,
        "",
        "2023-11-14",
        "2023-11-14T22:13:20",
        "2023-11-14T22:13:20Z",
        "2023-11-14t22:13:20z",
        "0001-01-01T00:00:00+23:59",
        "9999-12-31T23:59:59-23:59",
        "9999-12-31T23:59:59.999999+00:00",
        "2023-02-30T00:00:00Z",
        "yesterday",
        None,
        [],
        {},
    ]
)

valid_rating = st.floats(DEFAULT_LIMITS.rating_min, DEFAULT_LIMITS.rating_max) | st.sampled_from(
    [0.5, 5, 5.0, 1, 3]
)
boundary_rating = st.sampled_from(
    [0.4999999, 5.0000001, 0, -1, 6, 10**400, -(10**400), float("nan"), float("inf"), True, "4", None]
)


@st.composite
def valid_record(
    draw: st.DrawFn, kind: str | None = None, text: st.SearchStrategy[str] = clean_text
) -> dict[str, Any]:
    """A record the contract accepts (of `kind`, or any)."""
    kind = kind or draw(st.sampled_from(KINDS))
    if kind == "item":
        rec: dict[str, Any] = {"item_id": draw(ident(text)), "text": draw(text)}
        if draw(st.booleans()):
            rec["attrs"] = draw(st.dictionaries(clean_text, st.integers() | clean_text, max_size=3))
        return rec
    rec = {"event_id": draw(ident(text)), "user_id": draw(ident(text)), "ts": draw(valid_ts)}
    if kind == "click":
        rec["item_id"] = draw(ident(text))
        if draw(st.booleans()):
            rec["impressions"] = draw(st.lists(ident(text), max_size=4))
        if draw(st.booleans()):
            rec["dwell_ms"] = draw(st.integers(0, 10**12))
    elif kind == "search":
        rec["query"] = draw(
            text.filter(lambda s: s.strip())
            .map(lambda s: s[: DEFAULT_LIMITS.max_query_len])
            .filter(str.strip)
            | st.just("q" * DEFAULT_LIMITS.max_query_len)
        )
        if draw(st.booleans()):
            rec["clicked_item_id"] = draw(ident(text))
    else:
        rec["item_id"] = draw(ident(text))
        rec["rating"] = draw(valid_rating)
    if draw(st.booleans()):
        rec["type"] = kind
    return rec


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "event_id",
    "user_id",
    "ts",
    "item_id",
    "impressions",
    "dwell_ms",
    "query",
    "clicked_item_id",
    "rating",
    "type",
    "text",
    "attrs",
    "embedding",
]
BOUNDARY = {
    "event_id": boundary_ids,
    "user_id": boundary_ids,
    "item_id": boundary_ids,
    "clicked_item_id": boundary_ids,
    "ts": boundary_ts,
    "rating": boundary_rating,
    "dwell_ms": st.sampled_from([-1, 0, 10**30, True, 1.0, "5", None]),
    "impressions": st.sampled_from([[], ["a"], [""], ["x" * 129], "a", [1], None, [None]]),
    "query": st.sampled_from(["", " ", "q" * 1024, "q" * 1025, 5, None, "\x00"]),
    "type": st.sampled_from([*KINDS, "CLICK", "", None, 1]),
    "text": st.sampled_from(["", "\x00", None, 1, ["a"]]),
    "attrs": st.sampled_from([None, {}, [], "a", {"k": [1, {"x": None}]}]),
    "embedding": st.sampled_from(
        [None, [], [1], [1.5, -2], [float("nan")], [float("inf")], [True], ["1"], 1]
    ),
}


@st.composite
def mutated_record(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid record with fields dropped, set to boundary values, or to arbitrary JSON."""
    kind = draw(st.sampled_from(KINDS))
    rec = draw(valid_record(kind))
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        action = draw(st.sampled_from(["drop", "boundary", "json"]))
        if action == "drop":
            rec.pop(field, None)
        elif action == "boundary":
            rec[field] = draw(BOUNDARY[field])
        else:
            rec[field] = draw(json_values)
    return kind, rec


def encode(rec: Any) -> bytes:
    """JSON as a producer might send it (Python's encoder writes NaN and Infinity, which it reads back)."""
    return json.dumps(rec).encode("utf-8", "surrogatepass")
