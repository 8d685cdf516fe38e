"""`istream explain USER`: which of a user's events shaped their current interest vector.

Rebuilt from Postgres alone: the catalog (`items`), the user's applied events
(`applied_events`, in event-time order) and the newest published weights of the
configured model (`model_versions.weights`). The user's events are replayed into
a fresh state without training, then the model's `explain` weighs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select

from models import weights_io
from models.core import Explainable, TrainableWeights
from models.events import Event
from storage.schema import AppliedEvent, CatalogItem
from stream.runtime import build_interest_model
from stream.settings import Settings


class ExplainError(Exception):
    """Something the user can fix (unknown user, a model that cannot explain, ...)."""


@dataclass(slots=True)
class Explanation:
    user_id: str
    model: str
    model_version: str | None  # the published weights used; None = untrained weights
    n_events: int
    rows: list[dict[str, Any]]


def user_events(engine: Engine, user_id: str) -> list[Event]:
    a = AppliedEvent
    with engine.connect() as conn:
        rows = conn.execute(
            select(a.event_id, a.kind, a.item_id, a.ts, a.rating).where(a.user_id == user_id).order_by(a.ts)
        ).all()
    return [
        Event(
            event_id=event_id,
            user_id=user_id,
            ts=ts.timestamp(),
            kind=kind,
            item_id=item_id if kind != "search" else None,
            clicked_item_id=item_id if kind == "search" else None,
            rating=rating,
        )
        for event_id, kind, item_id, ts, rating in rows
    ]


def explain_user(settings: Settings, engine: Engine, user_id: str, top: int = 10) -> Explanation:
    from storage.repository import VectorStore

    events = user_events(engine, user_id)
    if not events:
        raise ExplainError(f"user {user_id!r} has no applied events in this database")
    model = build_interest_model(settings)
    if not isinstance(model, Explainable) or not isinstance(model, TrainableWeights):
        raise ExplainError(
            f"model {settings.model!r} cannot explain its vectors; use adapter, top_layers:k or lora:r"
        )
    model.upsert_items(VectorStore(engine).load_catalog())
    saved = VectorStore(engine).latest_weights(str(model.config().get("model", settings.model)))
    if saved is not None:
        try:
            weights_io.verify(saved.weights, saved.sha256)
            model.load_weights(saved.weights)
        except weights_io.WeightsRejected as exc:
            raise ExplainError(f"refused the weights of {saved.version}: {exc.reason}") from None
    model.rebuild_user(user_id, events)
    rows = model.explain(user_id, top=top)
    with engine.connect() as conn:
        ids = [r["item_id"] for r in rows if r.get("item_id")]
        titles = dict(
            conn.execute(
                select(CatalogItem.item_id, CatalogItem.text).where(CatalogItem.item_id.in_(ids))
            ).all()
        )
    for r in rows:
        r["title"] = titles.get(r.get("item_id") or "")
    return Explanation(user_id, settings.model, saved[0] if saved else None, len(events), rows)
