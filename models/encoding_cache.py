"""The cache of base encodings, keyed by text: what a restart restores from Postgres.

Apart from `models.encoder` so that the worker's batch path (and `storage.encodings`)
loads without torch.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np


def text_key(text: str) -> str:
    """The persisted key of a text's encoding (the text itself is not stored)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class EncodingCache:
    """A bounded LRU of text -> vector for one base version; exportable for persistence.

    Encodings restored from storage are keyed by `text_key(text)` (the store keeps
    hashes, not texts); they move into the LRU the first time their text is asked for.
    """

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._restored: dict[str, np.ndarray] = {}
        # Texts (by text_key) whose encodings the store already holds: restored or saved. A
        # restart re-applies the whole catalog, and offering 1,682 stored 384-d rows again to
        # be skipped by the key cost the worker 4 s of its start.
        self._saved: set[str] = set()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, text: str) -> np.ndarray | None:
        vec = self._data.get(text)
        if vec is None and self._restored:
            vec = self._restored.pop(text_key(text), None)
            if vec is not None:
                self.put(text, vec)
        if vec is None:
            self.misses += 1
            return None
        self._data.move_to_end(text)
        self.hits += 1
        return vec

    def put(self, text: str, vec: np.ndarray) -> None:
        self._data[text] = vec
        self._data.move_to_end(text)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def items(self) -> Iterable[tuple[str, np.ndarray]]:
        return list(self._data.items())

    def unsaved(self, texts: Iterable[str] | None = None) -> list[tuple[str, np.ndarray]]:
        """(text, vector) of cached encodings the store lacks (of `texts` only, when given)."""
        # Restored encodings are stored by definition, so only the LRU is looked at (a peek:
        # persistence is not a use, and counts no hit).
        pairs = self._data.items() if texts is None else ((t, self._data.get(t)) for t in texts)
        return [(t, v) for t, v in pairs if v is not None and text_key(t) not in self._saved]

    def mark_saved(self, texts: Iterable[str]) -> None:
        self._saved.update(text_key(t) for t in texts)

    def restore_hashed(self, entries: Iterable[tuple[str, np.ndarray]]) -> int:
        """Add persisted (text_key, vector) pairs; returns how many."""
        n = 0
        for key, vec in entries:
            if len(self._restored) >= self.max_entries:
                break
            self._restored[key] = np.asarray(vec, dtype=np.float32)
            self._saved.add(key)
            n += 1
        return n

    def load(self, entries: Iterable[tuple[str, np.ndarray]]) -> int:
        n = 0
        for text, vec in entries:
            self.put(text, np.asarray(vec, dtype=np.float32))
            n += 1
        return n
