"""Wiring from settings to parts: encoder, model, store. Shared by worker, CLI and backtest."""

from __future__ import annotations

import gc
import importlib
import logging
import random
from typing import TYPE_CHECKING

import numpy as np

from models.base_model import DEFAULT_BASE_MODEL, base_hidden_size
from storage.db import make_engine
from storage.repository import RetentionPolicy, VectorStore
from stream.schema import Limits
from stream.settings import Settings

if TYPE_CHECKING:
    from models.core import InterestModel
    from models.encoder import BaseEncoder

# torch, transformers and the model registry are imported where a model is built: `istream
# status`, `db upgrade`, `produce` and `replay` need none of them (seconds per call).


def settle_heap() -> None:
    """Call once the model is loaded, before the event loop of a worker or a replay.

    torch and transformers leave millions of long-lived objects that every full
    collection scanned again, and a batch allocates enough to trigger collections
    often: freezing that heap and collecting young objects less often took the
    adapter's batch path from 152 to 105 us/event (20 batches of 2,000, 2 cores).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def limits(settings: Settings) -> Limits:
    return Limits(
        max_id_len=settings.max_id_len,
        max_query_len=settings.max_query_len,
        rating_min=settings.rating_min,
        rating_max=settings.rating_max,
    )


def base_model_name(settings: Settings) -> str:
    return settings.base_model or DEFAULT_BASE_MODEL


def build_encoder(settings: Settings) -> BaseEncoder:
    from models.encoder import BaseEncoder

    return BaseEncoder(settings.base_model, device=settings.device)


def load_plugins(settings: Settings) -> None:
    """Import the modules of ISTREAM_PLUGINS (comma-separated), which may register models."""
    for name in filter(None, (n.strip() for n in settings.plugins.split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise PluginError(f"cannot import plugin {name!r} (ISTREAM_PLUGINS): {exc}") from exc


class PluginError(ImportError):
    """A module named in ISTREAM_PLUGINS cannot be imported (reported in one line)."""


def build_interest_model(settings: Settings, encoder: BaseEncoder | None = None) -> InterestModel:
    from models.registry import build_model

    load_plugins(settings)
    seed_everything(settings.seed)
    encoder = encoder or build_encoder(settings)
    return build_model(settings.model, encoder, **model_options(settings))


FINE_TUNED = ("adapter", "top_layers", "lora")


def spec_of(label: str) -> str:
    """The model spec of a label that may name an option set (`adapter@p10` -> `adapter`), as the
    scripts' and benchmarks' `--models` and `--opt` take them."""
    return label.split("@")[0]


def is_fine_tuned(spec: str) -> bool:
    """Whether a model spec (`lora:8`, or a label `adapter@p10` naming an option set) is one of
    the fine-tuned strategies, which take `FineTuneOptions`."""
    return spec_of(spec).partition(":")[0] in FINE_TUNED


def model_options(settings: Settings) -> dict[str, object]:
    """Settings -> options of the configured model (each family takes its own)."""
    options: dict[str, object] = {"half_life_s": settings.half_life_s, "rating_max": settings.rating_max}
    if settings.model.partition(":")[0] == "sasrec":
        options["seed"] = settings.seed  # its offline training is seeded by the run's seed
    if is_fine_tuned(settings.model):
        options.update(
            dim=settings.model_dim,
            history=settings.model_history,
            lr=settings.model_lr,
            events_per_step=settings.model_events_per_step,
            budget_unit=settings.model_budget_unit,
            drift=settings.model_drift,
            blocks=settings.model_blocks,
            lookahead_targets=settings.model_lookahead,
            id_dropout=settings.model_id_dropout,
            cooc_rank=settings.model_cooc_rank,
            cooc_max_pairs=settings.model_cooc_max_pairs,
            replay_size=settings.model_replay_size,
            publish_every_steps=settings.model_publish_every_steps,
            publish_every_s=settings.model_publish_every_s,
            rating_min=settings.rating_min,
            seed=settings.seed,
            deterministic=settings.model_deterministic,
            device=settings.device,
            bf16=settings.model_bf16,
            dp_epsilon=settings.dp_epsilon,
            dp_delta=settings.dp_delta,
            dp_noise_multiplier=settings.dp_noise_multiplier,
            dp_clip=settings.dp_clip,
            dp_max_events_per_window=settings.dp_max_events_per_user_window,
            dp_window_s=settings.dp_window_s,
            dp_max_participations=settings.dp_max_participations,
            dp_clock_events_per_batch=settings.dp_clock_events_per_batch,
            dp_publish_every_steps=settings.dp_publish_every_steps,
        )
    return options


def published_dim(settings: Settings) -> int:
    """Width of the vectors the configured model writes to Postgres, without loading the model.

    The database's vector width is fixed when it is migrated, so the embedded server is
    migrated with this width and a worker refuses a database migrated for another.
    """
    base = base_hidden_size(settings.base_model)
    if is_fine_tuned(settings.model):
        # Fine-tuned models publish [user, 1] / [item, bias] so a plain inner product ranks.
        return (settings.model_dim or base) + 1
    return base


def vector_width(settings: Settings) -> int:
    """Width a new database is migrated with: ISTREAM_VECTOR_DIM when set, else what the model writes."""
    return settings.vector_dim or published_dim(settings)


def build_store(settings: Settings, url: str) -> VectorStore:
    # No pre-ping: it cost a round trip per checkout, several per batch. A connection that
    # died with Postgres fails its batch, SQLAlchemy then drops the whole pool, and the
    # batch is retried (stream.resilience), which is what the ping would have led to anyway.
    return VectorStore(make_engine(url, pool_size=4, pool_pre_ping=False), group_id=settings.group_id)


def retention_policy(settings: Settings) -> RetentionPolicy:
    return RetentionPolicy.from_seconds(
        settings.retention_keep_versions, settings.retention_keep_all_s, settings.retention_hourly_s
    )


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
