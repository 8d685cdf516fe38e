"""Interest drift: river's ADWIN on the prequential loss, for the stream and for each user.

The loss of a target is measured before the step learns it (prequential), so a
rise means the model's picture of the stream, or of one user, went stale:

- global drift (the mean loss of the fresh targets of a step rose): the learning
  rate is boosted for a while, so the shared weights catch up faster;
- a user's drift (their own targets' loss rose): their attention window is cut
  to their newest behaviours and their long-term average restarts, so their
  vector follows the new interest instead of averaging it with the old one.

Detectors exist only for recently active users (an LRU bound), so memory stays
flat however many users the stream has.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from river.drift import ADWIN


@dataclass
class DriftStats:
    global_drifts: int = 0
    user_drifts: int = 0


class DriftMonitor:
    def __init__(
        self,
        delta: float = 0.002,
        max_users: int = 50_000,
        boost: float = 3.0,
        boost_steps: int = 20,
    ) -> None:
        self.delta = delta
        self.max_users = max_users
        self.boost = boost
        self.boost_steps = boost_steps
        # clock=1: test for a change after every value (a step or a target is rare enough).
        self._global = ADWIN(delta=delta, clock=1)
        self._users: OrderedDict[str, ADWIN] = OrderedDict()
        self._boost_left = 0
        self.stats = DriftStats()

    @property
    def lr_multiplier(self) -> float:
        return self.boost if self._boost_left > 0 else 1.0

    def step_done(self) -> None:
        if self._boost_left > 0:
            self._boost_left -= 1

    def global_loss(self, loss: float) -> bool:
        """Feed a step's mean fresh loss; True when it drifted upwards (the boost starts)."""
        before = self._global.estimation
        self._global.update(loss)
        if self._global.drift_detected and self._global.estimation > before:
            self._boost_left = self.boost_steps
            self.stats.global_drifts += 1
            return True
        return False

    def user_loss(self, user_id: str, loss: float) -> bool:
        """Feed one of a user's prequential losses; True when that user's loss drifted upwards."""
        det = self._users.pop(user_id, None)
        if det is None:
            det = ADWIN(delta=self.delta, clock=1)
            if len(self._users) >= self.max_users:
                self._users.popitem(last=False)
        self._users[user_id] = det
        before = det.estimation
        det.update(loss)
        if det.drift_detected and det.estimation > before:
            self.stats.user_drifts += 1
            return True
        return False

    def forget(self, user_id: str) -> None:
        self._users.pop(user_id, None)
