"""Settings (ISTREAM_MODEL_*) reach the fine-tuned model's options through stream.runtime."""

from __future__ import annotations

from models.finetune import FineTunedModel
from stream.runtime import build_interest_model, model_options
from stream.settings import Settings
from tests.fakes import HashEncoder


def test_settings_become_model_options() -> None:
    s = Settings(model="lora:4", model_dim=12, model_history=7, model_lr=0.01, seed=5, device="cpu")
    opts = model_options(s)
    assert opts["dim"] == 12 and opts["history"] == 7 and opts["lr"] == 0.01 and opts["seed"] == 5
    assert "dim" not in model_options(Settings(model="decayed_mean"))


def test_runtime_builds_the_configured_strategy() -> None:
    s = Settings(model="adapter", model_dim=8, model_publish_every_steps=7, device="cpu")
    m = build_interest_model(s, HashEncoder(16))  # type: ignore[arg-type]
    assert isinstance(m, FineTunedModel) and m.spec == "adapter"
    assert m.opts.dim == 8 and m.opts.publish_every_steps == 7 and m.dim == 9


def test_the_cooccurrence_rank_setting_reaches_the_model() -> None:
    """ISTREAM_MODEL_COOC_RANK: unset, 32 (0 under DP); 0 turns the factors off."""
    for rank, dp, want in ((None, None, 32), (0, None, 0), (8, None, 8), (None, 1.0, 0)):
        s = Settings(model="adapter", model_dim=8, model_cooc_rank=rank, dp_noise_multiplier=dp, device="cpu")
        m = build_interest_model(s, HashEncoder(16))  # type: ignore[arg-type]
        assert isinstance(m, FineTunedModel) and m.opts.cooc_rank == want
        assert (m.cooc is not None) == bool(want)
    bounded = build_interest_model(
        Settings(model="adapter", model_cooc_max_pairs=1000, device="cpu"), HashEncoder(16)
    )  # type: ignore[arg-type]
    assert isinstance(bounded, FineTunedModel) and bounded.opts.cooc_max_pairs == 1000
