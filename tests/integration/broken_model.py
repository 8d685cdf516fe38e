"""A deliberately broken model for the systemic-failure test, loaded by a worker through
ISTREAM_PLUGINS=tests.integration.broken_model: its learn step fails for every batch of
valid events, as a shape error after a configuration change would."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from models.decayed_mean import DecayedMeanModel
from models.events import Event
from models.registry import register


class ShapeBrokenModel(DecayedMeanModel):
    def learn(self, events: Sequence[Event]) -> Any:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x384 and 256x64)")


register("shape_broken", ShapeBrokenModel)
