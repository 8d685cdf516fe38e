"""All configuration, read once from ISTREAM_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# The interest model a worker, `make demo`, docker-compose and the backtest's default list use:
# the one place to change it. `decayed_mean` stays in the backtest list as the untrained baseline.
DEFAULT_MODEL = "adapter"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ISTREAM_", extra="ignore")

    # Servers. Unset means: start the embedded one (Tansu / PostgreSQL from pip wheels).
    kafka_bootstrap: str | None = None
    database_url: str | None = None
    data_dir: Path = Field(default=Path(".istream"), description="embedded servers' files")

    # Topics (DESIGN.md). All event topics share one partition count so a user's
    # events land in the same partition number everywhere.
    topic_clicks: str = "interest.clicks"
    topic_searches: str = "interest.searches"
    topic_ratings: str = "interest.ratings"
    topic_items: str = "interest.items"
    topic_dead_letter: str = "interest.dead-letter"
    partitions: int = Field(default=4, ge=1)
    group_id: str = "interest-stream"

    # Model.
    base_model: str | None = None  # path or name; unset = the packaged all-MiniLM-L6-v2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: str = DEFAULT_MODEL
    half_life_s: float = Field(default=3 * 86400.0, gt=0)
    seed: int = 0

    # Fine-tuned interest models (ISTREAM_MODEL=adapter | top_layers:k | lora:r; docs/model.md).
    model_dim: int = Field(default=64, ge=0)  # interest-space dimension; 0 = the base's (slower)
    model_history: int = Field(default=50, ge=1)  # recent behaviours a user vector attends over
    model_lr: float = Field(default=3e-3, gt=0)
    # The training budget: one optimisation step per N units, whatever the batch sizes (a worker
    # under backlog learns per event what the backtest learns). The unit is the positives that
    # train ranking (a log of mostly searches on items already had pays only for what it
    # teaches), or every event (`model_budget_unit="events"`).
    model_events_per_step: int = Field(default=50, ge=1)
    model_budget_unit: Literal["positives", "events"] = "positives"
    # The state that ranks a fresh positive also trains on the user's next positives up to N
    # behaviours later (0 = off): a stored vector ranks every event until it is next rewritten.
    model_lookahead: int = Field(default=2, ge=0)
    # Each training step hides the id residual and bias of this fraction of the catalog's rows
    # (DropoutNet): the text path learns to rank items on its own (0 = off).
    model_id_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    # Rank of the item co-occurrence factors in the item vectors (0 = none); unset: 32, or 0
    # under DP, whose guarantee the counts would not keep.
    model_cooc_rank: int | None = Field(default=None, ge=0)
    # The most item pairs those counts keep (each item's strongest), cut to at each checkpoint; 0 = no bound.
    model_cooc_max_pairs: int = Field(default=1_000_000, ge=0)
    # The user encoder: 0 = one attention read-out, k = k causal self-attention blocks.
    model_blocks: int = Field(default=0, ge=0)
    # ADWIN on the prequential loss (models/finetune/drift.py): learning-rate boost on a global
    # drift, a user's attention window cut to their newest behaviours on theirs.
    model_drift: bool = True
    model_replay_size: int = Field(default=20_000, ge=0)  # recent positives replayed against forgetting
    # A new model version every N training steps or T seconds, whichever comes first. Each
    # version writes the whole catalog's item vectors; between versions user vectors still follow
    # every event (computed with the published weights).
    model_publish_every_steps: int = Field(default=3, ge=1)
    model_publish_every_s: float = Field(default=10.0, gt=0)
    model_deterministic: bool = False  # deterministic kernels (with ISTREAM_SEED): same data, same numbers
    model_bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)

    # User-level differential privacy for the shared parameters of fine-tuned models
    # (docs/privacy.md). Off unless dp_epsilon or dp_noise_multiplier is set. When the budget
    # is spent the model freezes its shared parameters (no new versions; user vectors still
    # follow their events against the last published one).
    dp_epsilon: float | None = Field(default=None, gt=0)  # target total ε per user
    dp_delta: float | None = Field(default=None, gt=0, lt=1)  # unset: 1/(users seen)
    dp_noise_multiplier: float | None = Field(default=None, gt=0)  # σ; unset: calibrated from ε
    dp_clip: float = Field(default=1.0, gt=0)  # per-user L2 norm of one step's gradient
    dp_max_events_per_user_window: int = Field(default=32, ge=1)  # events of a user that train per window
    dp_window_s: float = Field(default=86400.0, gt=0)
    dp_max_participations: int = Field(default=50, ge=1)  # steps any one user's events may train
    dp_clock_events_per_batch: int = Field(default=100, ge=1)  # public popularity clock per batch
    # Under DP a version at most every N steps: each one releases noisy popularity counts.
    dp_publish_every_steps: int = Field(default=10, ge=1)

    # Event contract.
    rating_min: float = 0.5
    rating_max: float = 5.0
    max_id_len: int = 128
    max_query_len: int = 1024

    # Batching: a batch closes at batch_size events or batch_seconds after its first event.
    # Full batches only form under backlog, where bigger ones amortise the training step,
    # the round trips and the one row per user (not per event): with adapter, 2,000 ran
    # ~2x the events/s of 500 (bench/bench_freshness.py); at ordinary rates age closes them.
    batch_size: int = Field(default=2000, ge=1)
    # 0.5 s: freshness at low rates is about half of it plus one commit (p99 < 2 s at 100 ev/s).
    batch_seconds: float = Field(default=0.5, gt=0)

    # Consumer liveness: Tansu joins a group in ~3 s with these, ~23 s with client defaults.
    session_timeout_s: float = 10.0
    heartbeat_interval_s: float = 1.0

    log_level: str = "INFO"

    # Storage (issue 4, docs/storage.md). Vector width and backend are fixed when the
    # schema is migrated: `istream db upgrade` reads them; changing them later needs a new database.
    # Unset: the width the configured model writes (stream.runtime.vector_width).
    vector_dim: int | None = Field(default=None, ge=1, le=16000)
    vector_backend: Literal["auto", "pgvector", "array"] = "auto"
    # Retention: newest K versions and everything younger than keep_all are kept; beyond
    # that one version per hour up to `hourly` old, then one per day.
    retention_keep_versions: int = Field(default=10, ge=1)
    retention_keep_all_s: float = Field(default=86400.0, ge=0)
    retention_hourly_s: float = Field(default=7 * 86400.0, ge=0)
    retention_interval_s: float = Field(default=3600.0, ge=0)  # worker prunes this often; 0 = never
    # Events of an erased user stamped up to this long after the erasure are dropped too
    # (producer clock skew, events still on their way).
    erasure_grace_s: float = Field(default=3600.0, ge=0)

    # ---- stream processing (stream/worker.py, docs/stream.md) ----
    # Read-but-uncommitted records a worker may hold; beyond it consumption pauses
    # (bounded memory when training falls behind). 10 batches: one committing, one
    # learning, and room for every partition to fill its own (a full intake closes what
    # is open, and part-filled batches of many partitions mean more users per event).
    max_pending_records: int = Field(default=20_000, ge=1)
    # Before its first batch a worker reads the catalog topic to its end, for at most this long
    # (Kafka does not order the catalog before the events across topics); 0 = not at all.
    catalog_bootstrap_s: float = Field(default=120.0, ge=0)
    # Write a learned batch to Postgres while the next batch (of other partitions) learns.
    pipeline_commits: bool = True
    # Backoff cap while Postgres or the broker is away; retries go on until they come back.
    retry_max_wait_s: float = Field(default=5.0, gt=0)
    # SIGTERM: time to flush held batches; after it, retries stop and the rest is re-read on restart.
    shutdown_grace_s: float = Field(default=15.0, ge=0)
    # A batch that fails systemically (not a record's fault: docs/stream.md) is tried this many
    # times in all, offsets uncommitted; then the worker exits with status 70.
    systemic_max_attempts: int = Field(default=3, ge=1)
    # `istream status` reads these workers' /metrics (comma-separated URLs) for systemic
    # failures; empty: the local worker's, http://127.0.0.1:ISTREAM_METRICS_PORT/metrics.
    status_workers: str = ""
    # Python modules imported before the model is built, e.g. to `models.registry.register` a model.
    plugins: str = ""
    # Prometheus /metrics port; 0 turns the endpoint off.
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    lag_interval_s: float = Field(default=5.0, gt=0)
    # Longest a fetch waits at the broker for records (Faust's own is 1,500 ms; Tansu
    # answers at the end of the wait, so this bounds the read delay at low rates).
    fetch_max_wait_ms: int = Field(default=100, ge=0)
    log_format: Literal["text", "json"] = "text"

    # Backtests (stream/backtest, docs/backtest.md).
    # Comma-separated registry specs: the baselines and the default model.
    backtest_models: str = f"popularity,biased_mf,decayed_mean,{DEFAULT_MODEL}"
    backtest_batch_size: int = Field(default=100, ge=1)  # events per predict-then-learn micro-batch
    backtest_positive_threshold: float = 4.0  # ratings at or above this are positives
    backtest_windows: int = Field(default=40, ge=1)  # rolling-curve windows over the event-time span
    backtest_tail_fraction: float = Field(default=0.2, gt=0, le=1)  # totals also over this last fraction
    backtest_out_dir: Path = Path(".istream/backtests")  # a report folder per run is made under it
    backtest_encoding_cache: bool = True  # keep base encodings in data_dir/encodings between backtests
    backtest_fit_in_background: bool = True  # offline fits (sasrec) in a child process beside the replay

    @property
    def event_topics(self) -> dict[str, str]:
        """topic -> event kind."""
        return {
            self.topic_clicks: "click",
            self.topic_searches: "search",
            self.topic_ratings: "rating",
        }

    def topic_for_kind(self, kind: str) -> str:
        return {
            "click": self.topic_clicks,
            "search": self.topic_searches,
            "rating": self.topic_ratings,
            "item": self.topic_items,
        }[kind]

    @property
    def all_topics(self) -> list[str]:
        return [*self.event_topics, self.topic_items, self.topic_dead_letter]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
