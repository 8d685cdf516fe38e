"""Build an interest model from its configured name (ISTREAM_MODEL)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.catalog import TextEncoder
from models.core import InterestModel
from models.decayed_mean import DecayedMeanModel
from models.finetune import adapter_model, lora_model, top_layers_model

ModelFactory = Callable[..., InterestModel]

_FACTORIES: dict[str, ModelFactory] = {
    "decayed_mean": DecayedMeanModel,
    # Fine-tuning strategies (models/finetune.py): `adapter`, `top_layers:k`, `lora:r`.
    "adapter": adapter_model,
    "top_layers": top_layers_model,
    "lora": lora_model,
}


def register(name: str, factory: ModelFactory) -> None:
    _FACTORIES[name] = factory


def available() -> list[str]:
    return sorted(_FACTORIES)


def build_model(spec: str, encoder: TextEncoder, **options: Any) -> InterestModel:
    """`spec` is a model name, optionally with an argument after a colon (e.g. `top_layers:1`)."""
    name, _, arg = spec.partition(":")
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown model {spec!r}; choose one of: {', '.join(available())}")
    if arg:
        options["arg"] = arg
    return factory(encoder, **options)
