"""Build the models of a backtest by name, exactly as the worker builds its one model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import models.baselines  # noqa: F401  (registers the baselines with the registry)
from models.catalog import TextEncoder
from models.core import InterestModel
from stream.settings import Settings


def parse_model_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("no model names given")
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"model named twice: {', '.join(sorted(dup))}")
    return names


def check_models(names: list[str]) -> list[str]:
    """Fail early, with the choices, on a name the registry does not know."""
    from models.registry import available

    known = available()
    for name in names:
        if name.partition(":")[0] not in known:
            raise ValueError(f"unknown model {name!r}; choose from: {', '.join(known)}")
    return names


class LazyEncoder:
    """The base encoder, loaded on first use: baselines that never read text never pay for it.

    Every attribute is the real encoder's, so models see the `BaseEncoder` they expect.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._encoder: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._encoder is None:
            from stream.runtime import build_encoder

            self._encoder = build_encoder(self._settings)
        return getattr(self._encoder, name)


def build_models(
    names: Sequence[str], settings: Settings, encoder: TextEncoder | None = None
) -> dict[str, InterestModel]:
    """One model per name (`registry` specs such as `popularity`, `top_layers:1`), sharing one encoder.

    Each is built after re-seeding from `settings.seed`, so a model's numbers do not
    depend on which other models run beside it.
    """
    from stream.runtime import build_interest_model

    shared = encoder if encoder is not None else LazyEncoder(settings)
    return {
        name: build_interest_model(settings.model_copy(update={"model": name}), shared)  # type: ignore[arg-type]
        for name in names
    }
