"""The one interface that the Faust worker and the backtest both drive.

An `InterestModel` is fed time-ordered micro-batches of validated events.
`predict` scores the catalog for a user *before* a batch is learned (the
backtest's predict-then-learn protocol); `learn` applies the batch and returns
the users whose vectors changed, plus a model snapshot when it publishes one.
A user vector is only meaningful against the item vectors of the snapshot
(model version) it names.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from models.events import Event, Item, UserProfile


def pack_vector(vec: np.ndarray) -> str:
    """A float32 vector as base64 text: checkpointed user states stay JSON, but compact and cheap
    to encode (a JSON list of 384 floats cost more than the rest of a worker's batch)."""
    return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")


def unpack_vector(raw: str | Sequence[float]) -> np.ndarray:
    """Inverse of `pack_vector`; also reads states checkpointed as plain lists of floats."""
    if isinstance(raw, str):
        return np.frombuffer(base64.b64decode(raw), dtype="<f4").astype(np.float32)
    return np.asarray(raw, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class UserUpdate:
    user_id: str
    vector: np.ndarray
    n_applied: int  # events of this batch applied to the user
    last_event_ts: float
    cold_start: str | None = None  # which prior made the vector, when the user had no history


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """A published model version: the item space that user vectors are scored in."""

    version: str
    parent: str | None
    config: Mapping[str, Any]
    item_ids: Sequence[str]
    item_vectors: np.ndarray  # (len(item_ids), dim), aligned with item_ids
    metrics: Mapping[str, float] = field(default_factory=dict)
    weights: bytes | None = None  # serialised trainable state, when the model has any
    # A version whose weights these need besides their own (they carry only what was added
    # since it: the co-occurrence pairs of `models.finetune`); None when they stand alone.
    weights_base: str | None = None
    prior: np.ndarray | None = None  # the vector of a user the model knows nothing of, if it has one


@dataclass(slots=True)
class BatchResult:
    updates: dict[str, UserUpdate]
    model_version: str
    snapshot: ModelSnapshot | None = None  # set when this batch published a new version
    loss: float | None = None


# Optional capabilities: a model has them or not; callers check with isinstance, not hasattr.
@runtime_checkable
class BatchScorer(Protocol):
    """Scores many users at once: (len(user_ids), n_items) scores and which users were known."""

    def predict_many(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...


@runtime_checkable
class RatingPredictor(Protocol):
    def predict_rating(self, user_id: str, item_id: str) -> float | None: ...


@runtime_checkable
class TrainableWeights(Protocol):
    """Has shared trainable state that snapshots carry as bytes and a worker can adopt."""

    def weights(self) -> bytes: ...

    def load_weights(self, blob: bytes, base: Callable[[str], bytes | None] | None = None) -> None:
        """Adopt `blob`; `base(version)` gives another version's weights (None: not available)
        when these build on them (`ModelSnapshot.weights_base`)."""


@runtime_checkable
class Explainable(Protocol):
    """Can rebuild a user from their events and say which behaviours made their vector."""

    def rebuild_user(self, user_id: str, events: Sequence[Event]) -> None: ...

    def explain(self, user_id: str, top: int = 10) -> list[dict[str, Any]]: ...


class InterestModel(ABC):
    """Base class for interest models: small state, learn/predict, inspectable."""

    name: str = "model"
    # Scale-out: False on a worker that follows another's published weights (models with
    # shared trainable parameters then neither train nor publish; others ignore it).
    train_shared: bool = True

    @property
    @abstractmethod
    def model_version(self) -> str:
        """The version that user vectors returned now are to be scored against."""

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @abstractmethod
    def upsert_items(self, items: Sequence[Item]) -> None:
        """Add or replace catalog items (text, attrs, other-modality embeddings)."""

    @abstractmethod
    def item_ids(self) -> Sequence[str]: ...

    @abstractmethod
    def item_matrix(self) -> np.ndarray:
        """Current item vectors aligned with `item_ids()`."""

    @abstractmethod
    def user_vector(self, user_id: str) -> np.ndarray | None:
        """The user's current interest vector, or None for an unknown user."""

    @abstractmethod
    def learn(self, events: Sequence[Event]) -> BatchResult:
        """Apply a time-ordered batch; return the updated users."""

    def publish_due(self, n_events: int = 0) -> bool:
        """Whether learning `n_events` more events publishes a new model version (the worker then
        refreshes its catalog first). Models with one fixed version never do."""
        return False

    def privacy_state(self) -> dict[str, float]:
        """Differential-privacy figures (`dp_epsilon` spent so far, ...); empty when DP is off
        or the model learns nothing shared (models/privacy.py)."""
        return {}

    def set_profiles(self, profiles: Sequence[UserProfile]) -> None:  # noqa: B027
        """Side information for cold start; models that use none ignore it."""

    def snapshot(self) -> ModelSnapshot:
        return ModelSnapshot(
            version=self.model_version,
            parent=None,
            config=self.config(),
            item_ids=list(self.item_ids()),
            item_vectors=self.item_matrix(),
            prior=self.prior_vector(),
        )

    def prior_vector(self) -> np.ndarray | None:
        """What the model serves a user it knows nothing of (no history, search or profile), in the
        space of `item_matrix()`; None when it serves such a user nothing."""
        return None

    def config(self) -> dict[str, Any]:
        return {"model": self.name}

    def predict(self, user_id: str) -> np.ndarray | None:
        """Scores over `item_ids()` for the user, or None when the model knows nothing of them."""
        vec = self.user_vector(user_id)
        if vec is None:
            return None
        return self.item_matrix() @ vec

    # Per-user state: small and serialisable so a worker can checkpoint and restore it.
    @abstractmethod
    def get_user_state(self, user_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def set_user_state(self, user_id: str, state: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def forget_user(self, user_id: str) -> None:
        """Drop everything held about a user (erasure)."""

    def known_users(self) -> Sequence[str]:
        return []


@runtime_checkable
class OfflineFit(Protocol):
    """A model trained offline on a prefix of the stream before the replay starts (e.g. `sasrec`).

    The backtest calls `fit_offline(events)` once, after `upsert_items`, with the events before
    the tail slice (tie-aware: never part of a timestamp tie), then replays the whole stream;
    such a model's figures count only on the tail, which it never trained on. Returns what
    the training did (epochs, validation figures), for the report.
    """

    def fit_offline(self, events: Sequence[Event]) -> Mapping[str, Any]: ...
