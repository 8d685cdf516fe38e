"""Every registered model runs through the backtest, and the same seed gives the same numbers.

Parametrised over the registry, so a strategy registered later is covered without editing
this file. A tiny randomly initialised transformer stands in for the base (fast, and it has
the `model`/`tokenizer` that layer-training strategies need).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer, BertConfig, BertModel

import models.baselines  # noqa: F401  (registers the baselines)
from models.encoder import BaseEncoder, packaged_minilm_path
from models.registry import available
from stream.backtest import BacktestConfig, build_models, from_records, run_backtest
from stream.backtest.models import LazyEncoder
from stream.settings import Settings
from stream.sources import synthetic_log


def tiny_encoder() -> BaseEncoder:
    """A fresh base per run: reproducibility means a fresh process, caches empty."""
    import torch

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return BaseEncoder(model=BertModel(cfg), tokenizer=_tokenizer(), device="cpu")


@functools.cache
def _tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(str(packaged_minilm_path()))


_FAST = {"popularity", "biased_mf", "decayed_mean", "item_knn"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in _FAST else pytest.mark.slow) for n in available()]
)
def test_model_is_reproducible_through_the_backtest(name: str) -> None:
    data = from_records(synthetic_log(n_users=8, n_events=240, seed=11))
    cfg = BacktestConfig(batch_size=40, progress=False)
    settings = Settings(seed=5, device="cpu")
    runs = [run_backtest(build_models([name], settings, tiny_encoder()), data, cfg) for _ in range(2)]
    a, b = runs
    assert a.counts["ranked"] > 100
    np.testing.assert_array_equal(a.greater[name], b.greater[name])
    np.testing.assert_array_equal(a.ties[name], b.ties[name])
    assert a.totals() == b.totals()
    # Rating errors to 1e-6: numpy's float32 dot may sum in an order that depends on memory
    # alignment, which moves a predicted rating in its 9th digit, never a rank here.
    for model, errs in a.rating_totals().items():
        assert errs == pytest.approx(b.rating_totals()[model], rel=1e-6)


def test_base_encodings_are_kept_between_backtests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.runtime

    monkeypatch.setattr(stream.runtime, "build_encoder", lambda settings: tiny_encoder())
    texts = ["space rocket galaxy", "pasta recipe kitchen"]
    first = LazyEncoder(Settings(), tmp_path)
    assert not first.loaded
    vecs = first.encode(texts)
    assert first.cache.misses == 2
    assert first.save() == 2
    second = LazyEncoder(Settings(), tmp_path)
    again = second.encode(texts)
    assert second.cache.misses == 0  # restored, not re-encoded
    np.testing.assert_array_equal(vecs, again)
    assert second.save() == 0  # nothing new to write
    third = LazyEncoder(Settings(), tmp_path)
    third.encode(["a third text"])
    assert third.save() == 3  # merged with what was stored
    # A cache file that cannot be read is ignored (and replaced), never fatal.
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not a zip")
    fourth = LazyEncoder(Settings(), tmp_path)
    assert fourth.encode(texts).shape == (2, 32)
    assert fourth.save() == 2
