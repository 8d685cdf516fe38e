"""The item catalog as the core holds it: ids, texts, and their base encodings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from models.events import Item


class TextEncoder(Protocol):
    dim: int
    version: str

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray: ...


def item_text(text: str, attrs: Mapping[str, Any]) -> str:
    """The text the base sees for an item: its text plus its attributes, flattened."""
    parts = [text.strip()]
    for key in sorted(attrs):
        value = attrs[key]
        if isinstance(value, list | tuple):
            value = ", ".join(str(v) for v in value)
        if value not in (None, ""):
            parts.append(f"{key}: {value}")
    return " | ".join(p for p in parts if p)


class Catalog:
    """Items in arrival order with a growing matrix of base encodings (row i = item i)."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.items: list[Item] = []
        self._enc = np.zeros((0, encoder.dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.index

    @property
    def encodings(self) -> np.ndarray:
        return self._enc

    def upsert(self, items: Sequence[Item], progress: bool = False) -> list[int]:
        """Add or replace items; returns the row indices touched."""
        if not items:
            return []
        vecs = self.encoder.encode([item_text(i.text, i.attrs) for i in items], progress=progress)
        rows: list[int] = []
        new_vecs: list[np.ndarray] = []
        for item, vec in zip(items, vecs, strict=True):
            row = self.index.get(item.item_id)
            if row is None:
                row = len(self.ids)
                self.index[item.item_id] = row
                self.ids.append(item.item_id)
                self.items.append(item)
                new_vecs.append(vec)
            else:
                self.items[row] = item
                self._enc[row] = vec
            rows.append(row)
        if new_vecs:
            self._enc = np.concatenate([self._enc, np.stack(new_vecs)])
        return rows

    def row(self, item_id: str | None) -> int | None:
        return None if item_id is None else self.index.get(item_id)
