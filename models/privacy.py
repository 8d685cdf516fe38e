"""User-level differential privacy for the parameters a model learns across users.

Pure: events, tensors and numbers in, tensors and numbers out; no Kafka, no SQL, no model
internals. A trainer calls it in four places (see `models.finetune.trainer.Trainer`, "DP" blocks):

1. `admit(events)` before a step: which events may train shared parameters. Contribution
   bounding: at most `max_events_per_window` events per user per event-time window, and no
   events of a user who already took part in `max_participations` releases. Events that are
   not admitted still update the user's own state; they only do not train what is shared.
2. `privatize(per_user_grads)`: each user's gradient of the shared parameters (all of their
   loss terms of the step together) clipped to L2 norm `clip`, summed, Gaussian noise
   N(0, σ²·clip²) added, divided by the public constant `expected_users`.
3. `noisy_counts(per_user_rows, n)`: a histogram that enters published vectors (item
   popularity): each user's count vector clipped to L2 norm 1, summed, N(0, σ²) noise.
4. `record(user_ids)` after the release: participation counts for the accountant.

Accounting (docs/privacy.md). Users are not sampled at random (a stream takes whoever
shows up), so there is no subsampling amplification. Each release is a Gaussian mechanism
with L2 sensitivity `clip` per user (adding or removing one person changes the clipped sum
by at most `clip`); a step releases `releases_per_step` of them (gradient, and the count
histogram where one is kept). A user takes part in at most `max_participations` steps, so
their privacy loss is the composition of k·releases_per_step Gaussian mechanisms with noise
multiplier σ, where k is that user's participation count; the reported ε is the largest over
users, from opacus' accountant with sample_rate = 1 and steps = releases_per_step · k_max.
Under adaptive composition this holds for any order of releases, and a user's events only
affect the releases they took part in.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from models.events import Event

# Noise is calibrated at this δ when none is configured: the reported ε (at δ = 1/users seen)
# stays within the target up to 1/δ users; beyond, the budget check stops training.
CALIBRATION_DELTA = 1e-5
ACCOUNTANTS = ("prv", "rdp")


@lru_cache(maxsize=4096)
def epsilon_for(noise_multiplier: float, steps: int, delta: float, accountant: str = "prv") -> float:
    """ε(δ) of `steps` composed Gaussian mechanisms with noise multiplier σ, without sampling."""
    if steps <= 0:
        return 0.0
    from opacus.accountants import create_accountant

    with warnings.catch_warnings():
        # With sample_rate = 1 the PRV code takes the log of 0 in a branch np.where discards,
        # and RDP says when the best order is the largest it tried: neither changes the bound.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        acc = create_accountant(accountant)
        acc.history = [(float(noise_multiplier), 1.0, int(steps))]
        try:
            # PRV's numerical bound can come out a hair below 0 where ε is ~0.
            return max(0.0, float(acc.get_epsilon(delta=float(delta))))
        except (MemoryError, ValueError, OverflowError):
            if accountant == "rdp":
                raise
        # PRV discretises the privacy-loss range, which explodes for very small noise (ε in
        # the hundreds); RDP gives a (looser) bound there.
        rdp = create_accountant("rdp")
        rdp.history = acc.history
        return float(rdp.get_epsilon(delta=float(delta)))


def calibrate_noise(epsilon: float, delta: float, steps: int, accountant: str = "prv") -> float:
    """The noise multiplier at which `steps` Gaussian releases spend `epsilon` at `delta`."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=float(epsilon),
                target_delta=float(delta),
                sample_rate=1.0,
                steps=int(steps),
                accountant=accountant,
                epsilon_tolerance=0.005,
            )
        )


@dataclass(frozen=True, slots=True)
class DPConfig:
    """What the operator configures (ISTREAM_DP_*); `epsilon` and `noise_multiplier` both unset = off."""

    epsilon: float | None = None  # target total ε per user; the budget
    delta: float | None = None  # None: 1/(users seen) for reporting, CALIBRATION_DELTA for calibrating
    noise_multiplier: float | None = None  # σ; None: calibrated from epsilon
    clip: float = 1.0  # per-user L2 bound of one release
    max_events_per_window: int = 32
    window_s: float = 86400.0
    max_participations: int = 50  # releases any one user's events may train
    accountant: str = "prv"

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None or self.noise_multiplier is not None

    def check(self) -> None:
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError("DP epsilon must be > 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError("DP delta must be in (0, 1)")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError("DP noise multiplier must be > 0")
        if not self.clip > 0:
            raise ValueError("DP clip must be > 0")
        if self.max_events_per_window < 1 or self.max_participations < 1:
            raise ValueError("DP caps must be >= 1")
        if not self.window_s > 0:
            raise ValueError("DP window must be > 0 seconds")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"DP accountant must be one of {', '.join(ACCOUNTANTS)}")


class UserLevelDP:
    """Contribution bounding, the Gaussian mechanism and the accountant, for one trainer."""

    def __init__(
        self, config: DPConfig, *, releases_per_step: int = 1, expected_users: float = 16.0, seed: int = 0
    ) -> None:
        config.check()
        self.config = config
        self.releases_per_step = releases_per_step
        self.expected_users = float(expected_users)
        if config.noise_multiplier is not None:
            self.noise_multiplier = float(config.noise_multiplier)
        else:
            assert config.epsilon is not None
            self.noise_multiplier = calibrate_noise(
                config.epsilon,
                config.delta or CALIBRATION_DELTA,
                releases_per_step * config.max_participations,
                config.accountant,
            )
        self.participations: dict[str, int] = {}
        # After a restore from published weights every user counts as having taken part as
        # often as the busiest one had (the blob keeps no per-user data): sound, if cautious.
        self._floor = 0
        self._users_before = 0
        self._window: dict[str, tuple[int, int]] = {}  # user -> (window index, events admitted in it)
        self.users_seen: set[str] = set()
        self.releases = 0  # steps released (each `releases_per_step` Gaussian mechanisms)
        self.exhausted = False  # sticky: the budget would be exceeded by a further release
        self._gen = torch.Generator().manual_seed(seed * 7_919 + 17)
        self._np = np.random.default_rng(seed * 7_919 + 18)

    # ---- contribution bounding -------------------------------------------------------------
    def admit(self, events: Sequence[Event]) -> set[str]:
        """Event ids that may train shared parameters in this step (time order assumed)."""
        c = self.config
        out: set[str] = set()
        for e in events:
            self.users_seen.add(e.user_id)
            if self.participations.get(e.user_id, self._floor) >= c.max_participations:
                continue
            w = math.floor(e.ts / c.window_s)
            win, n = self._window.get(e.user_id, (w, 0))
            if win != w:
                win, n = w, 0
            if n >= c.max_events_per_window:
                continue
            self._window[e.user_id] = (win, n + 1)
            out.add(e.event_id)
        return out

    def participated(self, user_id: str) -> int:
        """Releases this user took part in (after a restore: at least the busiest user's count)."""
        return self.participations.get(user_id, self._floor)

    def may_release(self, user_ids: Iterable[str]) -> bool:
        """Whether a release with these participants keeps ε within the target; when not, the
        budget is spent (sticky) and the trainer stops releasing."""
        if self.exhausted:
            return False
        if self.config.epsilon is None:
            return True
        k = max((self.participations.get(u, self._floor) + 1 for u in user_ids), default=0)
        k = max(k, self.max_participations)
        if self.epsilon_at(k) > self.config.epsilon:
            self.exhausted = True
        return not self.exhausted

    def record(self, user_ids: Iterable[str]) -> None:
        """The step was released with these participants."""
        for u in set(user_ids):
            self.participations[u] = self.participations.get(u, self._floor) + 1
        self.releases += 1

    # ---- the mechanism ---------------------------------------------------------------------
    def privatize(
        self, per_user_grads: Sequence[Sequence[torch.Tensor | None]], like: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Clipped sum + noise, over users; `per_user_grads[u][j]` is user u's gradient of
        parameter j, shaped like `like[j]` (None = zero). Every parameter gets noise, also one
        no user moved: whether a gradient exists must not tell anything either."""
        C = self.config.clip
        total = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in like]
        for grads in per_user_grads:
            if len(grads) != len(like):
                raise ValueError("one gradient (or None) per parameter")
            present = [g.float().pow(2).sum() for g in grads if g is not None]
            sq = float(torch.stack(present).sum()) if present else 0.0
            factor = min(1.0, C / (math.sqrt(sq) + 1e-12))
            for j, g in enumerate(grads):
                if g is not None:
                    total[j].add_(g.float(), alpha=factor)
        out = []
        for t in total:
            noise = torch.randn(t.shape, generator=self._gen, dtype=torch.float32)
            out.append((t + noise.to(t.device) * (self.noise_multiplier * C)) / self.expected_users)
        return out

    def noisy_counts(self, per_user_rows: Mapping[str, Sequence[int]], n: int) -> np.ndarray:
        """Sum over users of their count vectors (occurrences per row), each clipped to L2 norm 1,
        plus N(0, σ²) on every one of the n rows (rows nobody touched included)."""
        out = self._np.normal(0.0, self.noise_multiplier, size=n)
        for rows in per_user_rows.values():
            if not rows:
                continue
            idx, cnt = np.unique(np.asarray(rows, dtype=np.int64), return_counts=True)
            norm = float(np.sqrt((cnt.astype(np.float64) ** 2).sum()))
            out[idx] += cnt / max(1.0, norm)
        return out

    # ---- the accountant --------------------------------------------------------------------
    @property
    def max_participations(self) -> int:
        return max(self.participations.values(), default=self._floor)

    @property
    def delta(self) -> float:
        if self.config.delta is not None:
            return self.config.delta
        return 1.0 / max(len(self.users_seen), self._users_before, 2)

    def epsilon_at(self, participations: int) -> float:
        return epsilon_for(
            self.noise_multiplier,
            self.releases_per_step * participations,
            self.delta,
            self.config.accountant,
        )

    @property
    def epsilon(self) -> float:
        """ε spent so far: the privacy loss of the user who took part in the most releases."""
        return self.epsilon_at(self.max_participations)

    def checkpoint(self) -> dict[str, float]:
        """What travels with published weights: counts, no user ids."""
        return {
            "max_participations": float(self.max_participations),
            "users_seen": float(max(len(self.users_seen), self._users_before)),
            "releases": float(self.releases),
            "exhausted": float(self.exhausted),
        }

    def restore(self, saved: Mapping[str, float]) -> None:
        self.participations.clear()
        self._window.clear()
        self.users_seen.clear()
        self._floor = int(saved.get("max_participations", 0))
        self._users_before = int(saved.get("users_seen", 0))
        self.releases = int(saved.get("releases", 0))
        self.exhausted = bool(saved.get("exhausted", 0))

    def state(self) -> dict[str, float]:
        """Figures for a snapshot's metrics (model_versions.metrics) and the worker's gauges."""
        return {
            "dp_epsilon": self.epsilon,
            "dp_delta": self.delta,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_max_participations": float(self.max_participations),
            "dp_releases": float(self.releases),
            "dp_budget_exhausted": float(self.exhausted),
        }
