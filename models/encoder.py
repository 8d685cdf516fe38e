"""The pretrained base: text -> pooled sentence vector, with a bounded cache.

Encoding through the whole transformer is the slow part of the system (about
200 short titles per second on 2 CPU cores), while item texts rarely change, so
every encoding is cached by (base version, text).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

# Re-exported: the base's location is read without torch from models.base_model.
from models.base_model import DEFAULT_BASE_MODEL as DEFAULT_BASE_MODEL
from models.base_model import packaged_minilm_path as packaged_minilm_path
from models.base_model import resolve_base_path as resolve_base_path
from models.encoding_cache import EncodingCache as EncodingCache
from models.encoding_cache import text_key as text_key


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
