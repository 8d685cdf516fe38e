"""models.weights_io: tensors and JSON round-trip; pickles, junk and wrong checksums are refused."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

from models import weights_io
from models.weights_io import WeightsRejected


class Marker:
    """Unpickling this creates a file: proof that loading ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def crafted_blobs(marker: Path) -> dict[str, bytes]:
    """What an attacker with write access to model_versions might store."""
    buf = io.BytesIO()
    torch.save({"net": {"w": torch.ones(2)}, "item_ids": ["a"], "evil": Marker(marker)}, buf)
    return {"torch.save": buf.getvalue(), "pickle": pickle.dumps({"net": Marker(marker)})}


def test_round_trip_keeps_tensors_state_dicts_and_json() -> None:
    state = {"adapter.weight": torch.randn(3, 4), "item_bias": torch.arange(5, dtype=torch.float32)}
    entries = {
        "net": state,
        "item_ids": ["a", "b", "ü"],
        "config": {"model": "adapter", "dim": 8, "lr": 0.01, "flags": [True, None]},
        "popularity": torch.tensor([1.5, 0.0], dtype=torch.float64),
        "popularity_t": 12.5,
        "nothing": None,
    }
    blob = weights_io.dumps(entries)
    back = weights_io.loads(blob, required=("net", "item_ids"))
    assert set(back) == set(entries)
    assert set(back["net"]) == set(state)
    for k, t in state.items():
        assert torch.equal(back["net"][k], t)
    assert torch.equal(back["popularity"], entries["popularity"])
    assert back["popularity"].dtype == torch.float64
    assert back["item_ids"] == ["a", "b", "ü"]
    assert back["config"] == entries["config"]
    assert back["popularity_t"] == 12.5 and back["nothing"] is None
    assert weights_io.dumps(entries) == blob  # deterministic: versions are named by its digest


def test_bf16_and_non_contiguous_tensors_round_trip() -> None:
    t = torch.randn(4, 6).t()  # a view: not contiguous
    b = torch.randn(3, dtype=torch.bfloat16)
    back = weights_io.loads(weights_io.dumps({"net": {"t": t, "b": b}}))
    assert torch.equal(back["net"]["t"], t) and torch.equal(back["net"]["b"], b)


def test_values_that_are_neither_tensors_nor_json_are_refused_at_dump() -> None:
    with pytest.raises(ValueError, match="tensors or JSON"):
        weights_io.dumps({"x": object()})
    with pytest.raises(ValueError, match="must not contain"):
        weights_io.dumps({"a/b": 1})


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    blob = crafted_blobs(marker)[kind]
    with pytest.raises(WeightsRejected) as err:
        weights_io.loads(blob)
    assert err.value.kind == "format"
    assert not marker.exists()


@pytest.mark.parametrize(
    "blob",
    [b"", b"1234567", b"\x00" * 8, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx", b"\xff" * 64],
)
def test_junk_is_refused_with_a_reason(blob: bytes) -> None:
    with pytest.raises(WeightsRejected) as err:
        weights_io.loads(blob)
    assert err.value.kind == "format" and err.value.reason


def test_a_foreign_safetensors_file_or_a_truncated_blob_is_refused() -> None:
    from safetensors.torch import save

    with pytest.raises(WeightsRejected, match="not an interest-stream weights blob"):
        weights_io.loads(save({"w": torch.ones(2)}))
    blob = weights_io.dumps({"net": {"w": torch.ones(1000)}})
    with pytest.raises(WeightsRejected):
        weights_io.loads(blob[:-100])
    with pytest.raises(WeightsRejected, match="missing"):
        weights_io.loads(blob, required=("net", "item_ids"))


def test_checksum() -> None:
    blob = weights_io.dumps({"net": {"w": torch.ones(3)}})
    weights_io.verify(blob, weights_io.sha256_hex(blob))
    weights_io.verify(blob, weights_io.sha256_hex(blob).upper())
    tampered = blob[:-4] + b"\x00\x00\x80\x7f"  # same length, one float changed
    with pytest.raises(WeightsRejected) as err:
        weights_io.verify(tampered, weights_io.sha256_hex(blob))
    assert err.value.kind == "checksum"
    with pytest.raises(WeightsRejected) as err:
        weights_io.verify(blob, None)
    assert err.value.kind == "no_checksum"
