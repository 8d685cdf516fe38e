"""Unit tests of the storage pieces that need no server."""

from __future__ import annotations

import struct
from datetime import timedelta

import numpy as np
import pytest

from storage.repository import RetentionPolicy
from storage.vectors import FLOAT4_OID, Float4ArrayBinaryDumper, configured_dim


def _parse_float4_array(buf: bytes) -> list[float]:
    ndim, has_null, oid, length, lower = struct.unpack(">iiIii", buf[:20])
    assert (ndim, has_null, oid, lower) == (1, 0, FLOAT4_OID, 1)
    out = []
    pos = 20
    for _ in range(length):
        (size,) = struct.unpack(">i", buf[pos : pos + 4])
        assert size == 4
        out.append(struct.unpack(">f", buf[pos + 4 : pos + 8])[0])
        pos += 8
    assert pos == len(buf)
    return out


def test_binary_real_array_layout_round_trips() -> None:
    v = np.array([0.5, -1.25, 3.0e-8, 7.0], dtype=np.float32)
    dumped = Float4ArrayBinaryDumper(np.ndarray).dump(v)
    assert _parse_float4_array(bytes(dumped)) == v.tolist()
    # float64 input and 2-d row vectors are flattened to float4
    assert _parse_float4_array(
        bytes(Float4ArrayBinaryDumper(np.ndarray).dump(v.astype(np.float64)[None, :]))
    ) == (v.tolist())


@pytest.mark.parametrize("raw,ok", [("384", 384), (None, 384), ("8", 8)])
def test_configured_dim(monkeypatch: pytest.MonkeyPatch, raw: str | None, ok: int) -> None:
    monkeypatch.delenv("ISTREAM_VECTOR_DIM", raising=False)
    if raw is not None:
        monkeypatch.setenv("ISTREAM_VECTOR_DIM", raw)
    assert configured_dim() == ok


@pytest.mark.parametrize("raw", ["0", "abc", "20000"])
def test_configured_dim_refuses_nonsense(raw: str) -> None:
    with pytest.raises(ValueError, match="ISTREAM_VECTOR_DIM"):
        configured_dim(raw)


def test_retention_policy_refuses_pruning_the_current_version() -> None:
    with pytest.raises(ValueError, match="newest version"):
        RetentionPolicy(keep_versions=0)
    with pytest.raises(ValueError, match="hourly"):
        RetentionPolicy(keep_all=timedelta(days=2), hourly=timedelta(days=1))
