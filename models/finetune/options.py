"""Hyperparameters of the fine-tuned interest models (one dataclass, every field an option)."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Any

COOC_RANK = 32  # the co-occurrence factors' rank unless set (0 under DP)


def _check_whole(name: str, value: object, least: int) -> None:
    # JSON from --opt may be anything, and a bool is an int to isinstance.
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")


@dataclass
class FineTuneOptions:
    """Hyperparameters; every field can be set through `build_model(..., field=value)`."""

    # Interest dimension; 0/None = the base's. 64 learns as well on MovieLens and runs ~6x faster.
    dim: int | None = 64
    history: int = 50  # recent behaviours attended over
    # An item already among the recent behaviours is not added again (its searches still are):
    # repeated consumption would fill the window with one item.
    distinct_history: bool = True
    # Positives whose item the user already had train no ranking (their searches still train).
    new_items_only: bool = True
    lr: float = 3e-3
    # The rate's multiplier follows the hypergradient (cosine of the step's gradient and the last
    # update) at this speed, within `lr_hypergradient_range` (0 = a fixed rate).
    lr_hypergradient: float = 0.3
    lr_hypergradient_range: tuple[float, float] = (0.25, 4.0)
    item_lr_multiplier: float = 1.0
    item_eps: float = 1e-8
    weight_decay: float = 1e-5
    dropout: float = 0.1
    clip_norm: float = 5.0
    # The training budget: one optimisation step per this many units of `budget_unit`.
    events_per_step: int = 50
    # What the budget counts: "events", or "positives" (targets that train ranking: a log whose
    # events are mostly searches on items already had pays only for what it teaches).
    budget_unit: str = "positives"
    # The user encoder: 0 = one attention read-out queried by the newest behaviour (scored
    # higher on ML-100K: 0.0559 vs 0.0549 NDCG@10), k = k causal self-attention blocks.
    blocks: int = 0
    heads: int = 2
    adapter_hidden: int = 128
    lora_layers: int = 2
    # Negatives: the whole catalog when it has at most `full_softmax_max` items, else
    # in-batch positives + `random_negatives` uniform draws + the event's impressions.
    full_softmax_max: int = 5000
    random_negatives: int = 1024
    popular_negatives: float = 0.5  # share of the draws proportional to count^0.75 (log-Q corrected)
    loss: str = "softmax"  # or "bpr"
    positive_rating: float = 4.0
    rating_min: float = 0.5
    rating_max: float = 5.0
    rating_weight: float = 0.05
    search_weight: float = 0.5
    hard_negative_weight: float = 0.5
    # Item popularity enters the score as log(1 + decayed count) at several speeds, the clock
    # counted in events (scale-free); the model learns how much each speed counts.
    popularity_half_lives_events: tuple[float, ...] = (1e2, 1e3, 1e4, 1e5)
    # An item's id residual and bias count c / (c + this) of their value, c its slowest-decayed
    # event count (0 = always in full).
    id_evidence_events: float = 2.0
    # Each training step treats this fraction of the catalog's rows as if they had no evidence
    # (id residual and bias gated to zero; DropoutNet, Volkovs et al., 2017): the text path
    # learns to rank items alone, as it must for a new item. 0 = off. At 0.1 Last.fm's full stream
    # rose 6-7 % and ML-100K's stayed level (0.2 and 0.4 cost ML-100K more; docs/model.md).
    id_dropout: float = 0.1
    long_term_rate: float = 0.05
    # top_layers/lora: at most this many items run through the trained layers per step (a
    # weighted sample of the targets and the other candidates, `models.towers.sample_live_rows`).
    tower_items_per_step: int = 128
    # Learning rate of the trained transformer layers (top_layers) / LoRA adapters, times `lr`.
    layer_lr_multiplier: float = 0.01
    lora_lr_multiplier: float = 0.1
    tower_refresh_every: int = 10  # publishes between full re-encodings of the catalog (top_layers/lora)
    # Drift (models.finetune.drift): ADWIN on the prequential loss, globally (learning-rate boost
    # for a while) and per user (their attention window cut to their newest behaviours).
    drift: bool = True
    drift_delta: float = 0.002
    drift_lr_boost: float = 3.0
    drift_boost_steps: int = 20
    drift_keep: int = 5
    replay_size: int = 20_000
    replay_per_step: int = 64  # earlier positives replayed per step (against forgetting)
    replay_weight: float = 1.0  # all replayed targets of a step together, relative to the fresh ones
    # A stored user vector ranks every event of its user until it is next rewritten, not just
    # the next one (PinnerFormer's dense all-action loss): the state that ranks a fresh positive
    # is also trained on the user's next positives up to this many behaviours later, from the
    # same logits row (no extra user states), at `lookahead_weight` each, with the item biases held fixed
    # (they are the cold-start prior, learned from each event's own state).
    lookahead_targets: int = 2
    lookahead_weight: float = 0.5
    # Rank of the item co-occurrence factors added to item vectors through a learned map
    # (`models.finetune.cooccurrence`), refitted at every publish; 0 = none. Unset: 32, or 0
    # under DP (the counts are not privatised). It won on both shared sets (docs/model.md).
    cooc_rank: int | None = None
    # Publishes between versions whose weights carry all the co-occurrence counts; the versions
    # between carry the pairs since (docs/model.md, "Item co-occurrence factors").
    cooc_checkpoint_every: int = 10
    # The most item pairs the co-occurrence counts keep; past it, a checkpoint cuts them to 0.8
    # of it, each item's strongest by cosine first. They grow with the stream (item_knn's count
    # ~2 million after Last.fm's 258,000 events, 12 bytes each in a checkpoint); cut to a third
    # (ML-100K) and a quarter (Last.fm) of that they ranked level (docs/model.md). 0 = no bound.
    cooc_max_pairs: int = 1_000_000
    # Prequential rollback: when a batch's loss (before learning it) exceeds the rolling
    # mean by this fraction for `rollback_patience` batches, restore the last good weights.
    rollback_threshold: float = 0.5
    rollback_patience: int = 3
    rollback_window: int = 20
    # Served item vectors carry the items' popularity as of their publish: every 10 steps (~900
    # ML-100K events) left a new item unranked by its first events (new-item NDCG@10 0.0011;
    # every 3 steps 0.0037), at ~16 ms per publish for 1,682 items (docs/model.md).
    publish_every_steps: int = 3
    publish_every_s: float = 10.0
    good_state_every: int = 20  # publishes between copies of the weights kept for rollback
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    # Torch threads while learning on CPU (0 = leave torch's setting). A step is many small
    # ops, for which OpenMP synchronisation costs more than it saves: on a busy 2-core
    # machine one thread ran a 100-event batch in 73 ms, two threads in 477 ms.
    cpu_threads: int = 1
    bf16: bool = True
    # Accepted for interface compatibility with the other models (runtime passes it to all).
    half_life_s: float | None = None
    init_scale: float = 1.0  # logit scale on u·e at the start (learned)
    init_pop_weight: float = 1.0  # weight of log(1 + decayed count) at the start (learned)
    # User-level differential privacy (models/privacy.py, docs/privacy.md): off unless
    # dp_epsilon or dp_noise_multiplier is set.
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_noise_multiplier: float | None = None
    dp_clip: float = 1.0
    dp_max_events_per_window: int = 32
    dp_window_s: float = 86400.0
    dp_max_participations: int = 50
    # Under DP the popularity counts only decay between publishes, by a public clock of this
    # many events per batch (the true count would move with one person's events). 100: the
    # backtest's micro-batch.
    dp_clock_events_per_batch: int = 100
    # Under DP a publish also releases the popularity counts with noise, and the noise adds up
    # over releases: at most one publish per this many steps (ML-100K at ε = 8, a publish every
    # 3 steps: NDCG@10 0.0045 against 0.0071 every 10).
    dp_publish_every_steps: int = 10
    # The clipped, noised sum is divided by this public constant (not the step's user count,
    # which depends on who took part); Adam makes the learning rate nearly independent of it.
    dp_expected_users: float = 16.0
    dp_accountant: str = "prv"
    # Under DP a batch is learned in forward passes of at most this many (users × targets):
    # per-user gradients (one vmapped backward pass) hold a copy of the pass's logits per user.
    # One release per batch whatever the passes.
    dp_pass_budget: int = 4096

    def __post_init__(self) -> None:
        # Any other value would silently count events: say so instead.
        if self.budget_unit not in ("positives", "events"):
            raise ValueError(f"budget_unit must be 'positives' or 'events', got {self.budget_unit!r}")
        if not 0.0 <= self.id_dropout <= 1.0:  # a fraction of the rows (1: no id row trains)
            raise ValueError(f"id_dropout must be in [0, 1], got {self.id_dropout!r}")
        dp = self.dp_epsilon is not None or self.dp_noise_multiplier is not None
        if self.cooc_rank is None:
            self.cooc_rank = 0 if dp else COOC_RANK
        _check_whole("cooc_rank", self.cooc_rank, 0)
        _check_whole("cooc_checkpoint_every", self.cooc_checkpoint_every, 1)
        _check_whole("cooc_max_pairs", self.cooc_max_pairs, 0)
        if self.cooc_rank and dp:
            # The counts would carry each user's pairs unprotected into every published vector.
            raise ValueError("cooc_rank needs differential privacy off: its counts are not privatised")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> FineTuneOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown model option(s): {', '.join(unknown)}")
        return cls(**kwargs)


def parse_overrides(items: list[str], labels: Collection[str]) -> dict[str, dict[str, Any]]:
    """`LABEL:FIELD=JSON` strings (the scripts' and benchmarks' `--opt`) as {label: {field: value}}.

    `LABEL` is a model spec, optionally with `@name` so that one spec runs under several option
    sets in one run (`adapter@p10:publish_every_steps=10`); the spec may itself hold colons
    (`lora:8:lr=0.001`). `labels` are the run's models that take options: an option for any
    other label, or a field that is not a `FineTuneOptions` field, is refused here, before
    any model is built or any data read, instead of being silently ignored.
    """
    known = {f.name for f in fields(FineTuneOptions)}
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        label, sep, rest = item.rpartition(":")
        key, eq, value = rest.partition("=")
        if not sep or not eq:
            raise ValueError(f"--opt {item!r}: expected LABEL:FIELD=JSON")
        if label not in labels:
            raise ValueError(f"--opt {item!r}: {label!r} is not a fine-tuned model of --models")
        if key not in known:
            raise ValueError(f"--opt {item!r}: {key!r} is not a model option")
        try:
            out.setdefault(label, {})[key] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--opt {item!r}: the value is not JSON ({exc.msg})") from None
    for label, values in out.items():
        try:  # the options' own checks, here too: before the data is read, not after
            FineTuneOptions.from_kwargs(**values)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--opt {label}: {exc}") from None
    return out
