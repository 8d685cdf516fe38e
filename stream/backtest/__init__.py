"""Backtests: replay event logs through the same `models/` core the worker runs, predict-then-learn."""

from stream.backtest.data import (
    BacktestData,
    Rejected,
    from_records,
    load_jsonl,
    load_lastfm,
    load_movielens,
)
from stream.backtest.driver import BacktestConfig, BacktestResult, run_backtest
from stream.backtest.models import build_models

__all__ = [
    "BacktestConfig",
    "BacktestData",
    "BacktestResult",
    "Rejected",
    "build_models",
    "from_records",
    "load_jsonl",
    "load_lastfm",
    "load_movielens",
    "run_backtest",
]
