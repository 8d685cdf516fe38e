"""Build an interest model from its configured name (ISTREAM_MODEL)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from models.catalog import TextEncoder
from models.core import InterestModel

ModelFactory = Callable[..., InterestModel]

# The built-in models by import path ("module:attribute"), imported when one is built: the
# worker and the CLI check a model's name without seconds of torch and river imports.
_FACTORIES: dict[str, ModelFactory | str] = {
    "decayed_mean": "models.decayed_mean:DecayedMeanModel",
    # Fine-tuning strategies (models/finetune/): `adapter`, `top_layers:k`, `lora:r`.
    "adapter": "models.finetune:adapter_model",
    "top_layers": "models.finetune:top_layers_model",
    "lora": "models.finetune:lora_model",
}


def register(name: str, factory: ModelFactory) -> None:
    _FACTORIES[name] = factory


def _factory(name: str) -> ModelFactory | None:
    factory = _FACTORIES.get(name)
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = _FACTORIES[name] = getattr(importlib.import_module(module), attr)
    return factory


def available() -> list[str]:
    return sorted(_FACTORIES)


def build_model(spec: str, encoder: TextEncoder, **options: Any) -> InterestModel:
    """`spec` is a model name, optionally with an argument after a colon (e.g. `top_layers:1`)."""
    name, _, arg = spec.partition(":")
    factory = _factory(name)
    if factory is None:
        raise ValueError(f"unknown model {spec!r}; choose one of: {', '.join(available())}")
    if arg:
        options["arg"] = arg
    return factory(encoder, **options)
