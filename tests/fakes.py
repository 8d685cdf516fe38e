"""Fakes for unit tests only (integration tests use the real servers and the real base)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


class HashEncoder:
    """Deterministic bag-of-words encoder: texts sharing words get similar vectors."""

    def __init__(self, dim: int = 32) -> None:
        self.dim = dim
        self.version = f"hash-{dim}"
        self.calls = 0

    def _word(self, word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha1(word.encode()).digest()[:4], "little")
        return np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i] += self._word(word)
            norm = np.linalg.norm(out[i])
            if norm > 0:
                out[i] /= norm
        return out
