"""One backtest run end to end: source -> models -> replay -> report folder. The CLI is a thin shell on it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.catalog import TextEncoder
from models.core import BatchResult
from models.events import Event
from stream.backtest.data import BacktestData
from stream.backtest.driver import BacktestConfig, BacktestResult, LearnHook, run_backtest
from stream.backtest.models import LazyEncoder, build_models
from stream.backtest.report import code_version, write_report
from stream.runtime import settle_heap
from stream.settings import Settings


@dataclass(slots=True)
class RunOutcome:
    result: BacktestResult
    out_dir: Path | None
    files: list[Path]
    seconds: float
    pit_schemas: dict[str, str]
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)  # DP figures per model


@dataclass(frozen=True, slots=True)
class PointInTime:
    """Where the point-in-time mode writes: a database, a schema-name prefix, may it replace."""

    url: str
    prefix: str
    replace: bool = False


def default_out_dir(settings: Settings) -> Path:
    return settings.backtest_out_dir / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def config_from(settings: Settings, **overrides: Any) -> BacktestConfig:
    values: dict[str, Any] = {
        "batch_size": settings.backtest_batch_size,
        "positive_threshold": settings.backtest_positive_threshold,
        "windows": settings.backtest_windows,
        "tail_fraction": settings.backtest_tail_fraction,
        "seed": settings.seed,
        "fit_in_background": settings.backtest_fit_in_background,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return BacktestConfig(**values)


def run(
    data: BacktestData,
    model_names: list[str],
    settings: Settings,
    config: BacktestConfig,
    out_dir: Path | None,
    encoder: TextEncoder | None = None,
    on_learned: LearnHook | None = None,
    extra_meta: dict[str, Any] | None = None,
    pit: PointInTime | None = None,
) -> RunOutcome:
    started = time.perf_counter()
    code = code_version()  # before the run: the code that ran, not what the tree holds by the end
    # The seed is the backtest's, so that `--seed` alone makes a run reproducible.
    settings = settings.model_copy(update={"seed": config.seed})
    lazy = None
    if encoder is None:
        cache_dir = settings.data_dir / "encodings" if settings.backtest_encoding_cache else None
        lazy = LazyEncoder(settings, cache_dir)
    models = build_models(model_names, settings, encoder or lazy, users=len({e.user_id for e in data.events}))
    settle_heap()
    pit_schemas: dict[str, str] = {}
    if pit is None:
        result = run_backtest(models, data, config, on_learned=on_learned)
    else:
        from stream.backtest.pit import PointInTimeWriter
        from stream.runtime import base_model_name

        with PointInTimeWriter(pit.url, pit.prefix, models, base_model_name(settings), pit.replace) as w:

            def hook(name: str, events: Sequence[Event], res: BatchResult) -> None:
                w(name, events, res)
                if on_learned is not None:
                    on_learned(name, events, res)

            result = run_backtest(models, data, config, on_learned=hook)
            pit_schemas = dict(w.schemas)
    if lazy is not None:
        lazy.save()
    seconds = time.perf_counter() - started
    privacy = {n: st for n, m in models.items() if (st := m.privacy_state())}
    files: list[Path] = []
    if out_dir is not None:
        meta = {
            "data": {
                **data.source,
                "events": len(data.events),
                "items": len(data.items),
                "rejected": len(data.rejected),
                "rejected_first": [{"where": r.where, "reason": r.reason} for r in data.rejected[:20]],
                "duplicates": data.duplicates,
            },
            "code": code,
            "settings": {
                "base_model": settings.base_model,
                "device": settings.device,
                "half_life_s": settings.half_life_s,
                "seed": settings.seed,
            },
            "wall_seconds": seconds,
            # ε spent by each model with user-level DP (docs/privacy.md).
            "privacy": privacy,
            "point_in_time_schemas": pit_schemas,
            "finished_at": datetime.now(UTC).isoformat(),
            **(extra_meta or {}),
        }
        files = write_report(result, out_dir, meta)
    return RunOutcome(
        result=result,
        out_dir=out_dir,
        files=files,
        seconds=seconds,
        pit_schemas=pit_schemas,
        privacy=privacy,
    )
