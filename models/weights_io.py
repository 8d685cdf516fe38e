"""Model weights as bytes that can be read without running code, and their checksum.

Weights travel through the `model_versions` table from the trainer to every worker
that adopts a version. A pickle (what `torch.save` writes) runs code while it is
read, so anyone able to write that table could run code on every worker. Here a
blob is a safetensors file: raw tensors plus a JSON header. Reading it parses
JSON and copies bytes, nothing else. The non-tensor values (item ids, config,
scalars) are kept as JSON in the header's metadata.

A blob holds one flat mapping. Each entry is one of:

- a tensor,
- a mapping of name -> tensor (a state dict), stored as tensors named `key/name`,
- or any JSON value.

`sha256_hex` is recorded next to each blob when it is published, and `verify`
checks it before loading. The checksum catches a blob that was damaged or
swapped after publishing. It does not stop someone who can write both columns;
that attacker is stopped by the format, which can only ever yield tensors and JSON.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported where tensors are written or read: verifying a checksum
# and the exceptions are needed by modules (the worker's batch path) that load before torch.

FORMAT = "istream-weights/1"
_META_KEY = "istream"
_SEP = "/"
# A header bigger than this is not one we wrote (ours are a few hundred KB for 100k item ids).
_MAX_HEADER = 256 * 1024 * 1024


class WeightsRejected(ValueError):
    """A weights blob that must not be loaded; `kind` names the check it failed."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind  # "format" | "checksum" | "no_checksum"
        self.reason = reason


def sha256_hex(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def verify(blob: bytes, expected_sha256: str | None) -> None:
    """Refuse a blob whose SHA-256 is not the one recorded when it was published."""
    if not expected_sha256:
        raise WeightsRejected("no_checksum", "no SHA-256 was recorded for these weights")
    actual = sha256_hex(blob)
    if actual != expected_sha256.lower():
        raise WeightsRejected(
            "checksum", f"SHA-256 mismatch: recorded {expected_sha256[:16]}…, blob has {actual[:16]}…"
        )


def dumps(entries: Mapping[str, Any]) -> bytes:
    """Serialise tensors, state dicts and JSON values into one safetensors blob (deterministic)."""
    import torch
    from safetensors.torch import save as _st_save

    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, str] = {}
    values: dict[str, Any] = {}
    for key, value in entries.items():
        if _SEP in key:
            raise ValueError(f"entry name {key!r} must not contain {_SEP!r}")
        if isinstance(value, torch.Tensor):
            layout[key] = "tensor"
            tensors[key] = _plain(value)
        elif _is_state_dict(value):
            layout[key] = "tensors"
            for name, t in value.items():
                tensors[f"{key}{_SEP}{name}"] = _plain(t)
        else:
            layout[key] = "json"
            values[key] = value
    header = {"format": FORMAT, "layout": layout, "values": values}
    try:
        meta = json.dumps(header, sort_keys=True, allow_nan=True)
    except TypeError as exc:
        raise ValueError(f"weights entries must be tensors or JSON values: {exc}") from None
    return _st_save(tensors, metadata={_META_KEY: meta})


def loads(blob: bytes, *, device: torch.device | str = "cpu", required: Iterable[str] = ()) -> dict[str, Any]:
    """Inverse of `dumps`. Anything that is not such a blob raises `WeightsRejected` (kind "format")."""
    from safetensors.torch import load as _st_load

    meta = _header_metadata(blob)
    try:
        header = json.loads(meta)
        layout: dict[str, str] = header["layout"]
        values: dict[str, Any] = header["values"]
        if header.get("format") != FORMAT or not isinstance(layout, dict) or not isinstance(values, dict):
            raise ValueError(f"format {header.get('format')!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsRejected("format", f"unreadable weights header ({exc})") from None
    try:
        tensors = _st_load(bytes(blob))
    except Exception as exc:  # safetensors raises its own error type for every malformed file
        raise WeightsRejected("format", f"not a safetensors blob ({exc})") from None
    out: dict[str, Any] = {}
    for key, kind in layout.items():
        if kind == "tensor" and key in tensors:
            out[key] = tensors[key].to(device)
        elif kind == "tensors":
            prefix = key + _SEP
            out[key] = {n[len(prefix) :]: t.to(device) for n, t in tensors.items() if n.startswith(prefix)}
        elif kind == "json" and key in values:
            out[key] = values[key]
        else:
            raise WeightsRejected("format", f"entry {key!r} ({kind}) is missing from the blob")
    missing = [k for k in required if k not in out]
    if missing:
        raise WeightsRejected("format", f"entries {missing} are missing from the blob")
    return out


def _is_state_dict(value: object) -> bool:
    import torch

    if not isinstance(value, Mapping) or not value:
        return False
    return all(isinstance(v, torch.Tensor) for v in value.values())


def _plain(t: torch.Tensor) -> torch.Tensor:
    # safetensors wants contiguous CPU tensors that share no storage with each other.
    return t.detach().to("cpu").contiguous().clone()


def _header_metadata(blob: bytes) -> str:
    """Our JSON from the safetensors header: 8 bytes little-endian length, then the JSON header."""
    if len(blob) < 8:
        raise WeightsRejected("format", f"not a safetensors blob ({len(blob)} bytes)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(len(blob) - 8, _MAX_HEADER):
        raise WeightsRejected("format", "not a safetensors blob (bad header length)")
    try:
        header = json.loads(bytes(blob[8 : 8 + n]).decode("utf-8"))
        meta = header["__metadata__"][_META_KEY]
        if not isinstance(meta, str):
            raise TypeError("metadata is not text")
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsRejected("format", f"not an interest-stream weights blob ({exc})") from None
    return meta
