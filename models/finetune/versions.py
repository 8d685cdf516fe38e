"""Published versions: serving weights, version ids, and the weights' serialisation.

Training and serving are kept apart: the published item vectors and every user
vector written against them come from the weights of the published version,
run with `torch.func.functional_call` (the live module is never touched), while
the optimiser moves the live weights. Between publishes a user's vector still
follows each new behaviour at once; only the weights wait for the next publish.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from models import weights_io

# Per-item parameters: already inside the published item vectors, never swapped for serving.
PER_ITEM = ("item_emb", "item_bias", "rating_bias")


class Versions:
    """The published version: its id, parent, serving weights and item vectors."""

    def __init__(self, dim: int) -> None:
        self.version = ""
        self.parent: str | None = None
        self.serving: dict[str, torch.Tensor] = {}  # shared weights of the published version
        self.item_aug = np.zeros((0, dim + 1), dtype=np.float32)  # [e_item, β_item] rows
        self.publishes = 0
        self.last_publish = time.monotonic()

    def call(self, net: nn.Module, op: str, *args: Any) -> Any:
        """`net(op, *args)` with the published version's shared weights."""
        return functional_call(net, self.serving, (op, *args), strict=False)

    def publish(
        self, net: nn.Module, item_aug: np.ndarray, version: str, initial: bool = False
    ) -> str | None:
        """Make the live weights and item vectors the served ones; returns the previous
        version when `version` is new (None when nothing changed). `initial`: weights the
        model starts from or adopted (loaded) from another worker: they name the version,
        but are no child of ours, so the parent stays (a parent with two children would
        fork the line of versions in the registry)."""
        self.serving = {
            name: p.detach().clone()
            for name, p in net.named_parameters()
            if p.requires_grad and not name.startswith(PER_ITEM)
        }
        self.item_aug = item_aug.copy()
        self.publishes += 1
        self.last_publish = time.monotonic()
        if initial:
            self.version = version
            return None
        if version == self.version:
            return None
        previous = self.version
        self.parent, self.version = previous or None, version
        return previous

    def add_items(self, live_aug: np.ndarray, rows: Sequence[int]) -> None:
        """New items enter the published space at once (their text vector, no behaviour yet)."""
        self.item_aug = np.concatenate([self.item_aug, live_aug[len(self.item_aug) :]])
        if len(rows):
            self.item_aug[list(rows)] = live_aug[list(rows)]


def version_id(spec: str, blob: bytes, base_version: str) -> str:
    return f"{spec}-{hashlib.sha1(blob).hexdigest()[:12]}@{base_version}"


def pack_weights(
    net: nn.Module,
    item_ids: Sequence[str],
    config: Mapping[str, Any],
    popularity: np.ndarray,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """The trainable state (including the item residuals) and the items' decayed counts, as
    tensors-only bytes (`models.weights_io`: safetensors + JSON, never a pickle). `extra`:
    further entries (tensors or JSON values), e.g. under DP `dp` (the accountant's counts, no
    user ids) and `dp_pop_var` (the noise variance of each popularity column)."""
    trainable = {k: v for k, v in net.state_dict().items() if not k.startswith("tower.base")}
    return weights_io.dumps(
        {
            "net": trainable,
            "item_ids": list(item_ids),
            "config": dict(config),
            # Not trained, but part of the scores: the items' decayed counts.
            "popularity": torch.from_numpy(popularity.copy()),
            **(extra or {}),
        }
    )


def unpack_weights(blob: bytes, device: torch.device) -> dict[str, Any]:
    """Inverse of `pack_weights`: {"net", "item_ids", "config", "popularity"?, "dp"?,
    "dp_pop_var"?}. A blob from the database must not be able to run code: anything but such
    bytes raises `WeightsRejected`."""
    return weights_io.loads(blob, device=device, required=("net", "item_ids"))
