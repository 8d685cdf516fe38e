"""Build the models of a backtest by name, exactly as the worker builds its one model."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Imported for their side effect: each registers its baselines with the registry.
import models.baselines
import models.item_knn
import models.sasrec  # noqa: F401
from models.catalog import TextEncoder
from models.core import InterestModel
from stream.settings import Settings

log = logging.getLogger(__name__)


def parse_model_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("no model names given")
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"model named twice: {', '.join(sorted(dup))}")
    return names


# `adapter+dp8`: the model `adapter` with user-level DP at a total ε of 8 (docs/privacy.md).
_DP_SUFFIX = re.compile(r"^(?P<spec>[^+]+)\+dp(?P<eps>\d+(?:\.\d+)?)$")


def split_dp(name: str) -> tuple[str, float | None]:
    """A backtest model name -> (registry spec, DP ε or None)."""
    m = _DP_SUFFIX.match(name)
    if m is None:
        return name, None
    eps = float(m["eps"])
    if eps <= 0:
        raise ValueError(f"{name!r}: the ε after +dp must be > 0")
    return m["spec"], eps


def check_models(names: list[str]) -> list[str]:
    """Fail early, with the choices, on a name the registry does not know."""
    from models.registry import available
    from stream.runtime import FINE_TUNED, is_fine_tuned

    known = available()
    for name in names:
        spec, eps = split_dp(name)
        if spec.partition(":")[0] not in known:
            raise ValueError(f"unknown model {name!r}; choose from: {', '.join(known)}")
        if eps is not None and not is_fine_tuned(spec):
            raise ValueError(f"{name!r}: +dp applies to the fine-tuned models ({', '.join(FINE_TUNED)})")
    return names


class LazyEncoder:
    """The base encoder, loaded on first use: baselines that never read text never pay for it.

    Every attribute is the real encoder's, so models see the `BaseEncoder` they expect.
    With `cache_dir`, base encodings are kept between backtests in a file per base
    version (keyed by the text's hash, as `storage.encodings` keys them in Postgres),
    so a second run does not re-encode the catalog.
    """

    def __init__(self, settings: Settings, cache_dir: Path | None = None) -> None:
        self._settings = settings
        self._cache_dir = cache_dir
        self._encoder: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._encoder is None:
            from stream.runtime import build_encoder

            self._encoder = build_encoder(self._settings)
            stored = self._stored()
            if stored:
                self._encoder.cache.restore_hashed(stored.items())
        return getattr(self._encoder, name)

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def _file(self) -> Path | None:
        if self._cache_dir is None or self._encoder is None:
            return None
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self._encoder.version)
        return self._cache_dir / f"{safe}.npz"

    def _stored(self) -> dict[str, np.ndarray]:
        path = self._file()
        if path is None or not path.is_file():
            return {}
        try:
            with np.load(path) as data:
                return dict(zip(data["keys"].tolist(), data["vectors"], strict=True))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable encoding cache %s: %s", path, exc)
            return {}

    def save(self) -> int:
        """Write what this run encoded (merged with what was stored); returns the entries written."""
        path = self._file()
        if path is None or self._encoder.cache.misses == 0:
            return 0
        from models.encoding_cache import text_key

        entries = self._stored()
        entries.update({text_key(t): np.asarray(v, np.float32) for t, v in self._encoder.cache.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(list(entries)), vectors=np.stack(list(entries.values())))
        tmp.replace(path)  # readers never see a half-written file
        return len(entries)


def build_models(
    names: Sequence[str],
    settings: Settings,
    encoder: TextEncoder | LazyEncoder | None = None,
    users: int | None = None,
) -> dict[str, InterestModel]:
    """One model per name (`registry` specs such as `popularity`, `top_layers:1`), sharing one encoder.

    Each is built after re-seeding from `settings.seed`, so a model's numbers do not
    depend on which other models run beside it. A replay publishes by batch count only:
    a wall-clock trigger would make the figures depend on the machine's speed.
    `name+dpE` runs the model with user-level DP at total ε = E, at δ = ISTREAM_DP_DELTA or
    else 1/`users` (the number of users in the log) when given.
    """
    from stream.runtime import build_interest_model

    shared = encoder if encoder is not None else LazyEncoder(settings)
    out: dict[str, InterestModel] = {}
    for name in names:
        spec, eps = split_dp(name)
        update: dict[str, Any] = {"model": spec, "model_publish_every_s": float("inf")}
        if eps is not None:
            update["dp_epsilon"] = eps
            if settings.dp_delta is None and users:
                update["dp_delta"] = 1.0 / max(users, 2)
        out[name] = build_interest_model(settings.model_copy(update=update), shared)  # type: ignore[arg-type]
    return out
