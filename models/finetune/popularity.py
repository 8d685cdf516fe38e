"""Time-decayed event counts per catalog row: the popularity part of every item's bias.

The clock counts events, not seconds: half-lives of 10^2 .. 10^5 events fit a stream of any
pace (a month of one log is a day of another). Under differential privacy the counts move
only by noisy releases (`models.privacy.UserLevelDP.noisy_counts`), and between them only decay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from models.privacy import UserLevelDP


class ItemPopularity:
    """`counts[row, k]`: the row's events decayed with the k-th half-life (slowest last)."""

    def __init__(self, half_lives_events: Sequence[float], private: bool = False) -> None:
        hl = np.asarray(half_lives_events, dtype=np.float64)
        self.decay = 0.5 ** (1.0 / hl)
        self.private = private
        self.counts = np.zeros((0, len(hl)), dtype=np.float64)
        # DP: the variance of the noise in each column (it decays with the counts), and the rows
        # of the admitted events of each released user since the last release.
        self.noise_var = np.zeros(len(hl))
        self.unreleased: dict[str, list[int]] = {}
        # The clock: events seen, the count at the current timestamp's first event, the clock
        # the counts are decayed to, and the current timestamp.
        self._events = 0.0
        self._group = 0.0
        self._clock = 0.0
        self._ts = -math.inf

    def grow(self, n: int) -> None:
        if len(self.counts) < n:
            extra = np.zeros((n - len(self.counts), self.counts.shape[1]))
            self.counts = np.concatenate([self.counts, extra])

    def slowest(self) -> np.ndarray:
        """Each row's slowest-decayed count (what negatives are drawn by, what gates id rows)."""
        return self.counts[:, -1]

    def feature(self, rows: np.ndarray | slice | list[int], device: torch.device | str) -> torch.Tensor:
        """log(1 + decayed count) of `rows`. Under DP the counts carry noise of known spread:
        only what stands 2 standard deviations above it counts (post-processing; no extra
        privacy cost)."""
        counts = self.counts[rows]
        if self.private:
            counts = np.maximum(counts - 2.0 * np.sqrt(self.noise_var), 0.0)
        return torch.from_numpy(np.log1p(counts).astype(np.float32)).to(device)

    def update(self, ts: Sequence[float], rows: Sequence[int | None]) -> None:
        """Count one batch's events (their times, and their items' rows; None: not in the catalog).

        Events at one timestamp do not age each other (a log with month-level times lists a
        month's events in an arbitrary order). Each event's count is added pre-decayed by the
        clock's advance after it, and the catalog decays once per batch: O(events), not
        O(events x catalog)."""
        clocks = np.empty(len(ts), dtype=np.float64)
        for j, t in enumerate(ts):
            if t > self._ts:
                self._ts = t
                self._group = self._events
            clocks[j] = self._group
            self._events += 1
        if not len(ts):
            return
        now = clocks[-1]
        self.counts *= self.decay ** (now - self._clock)
        self._clock = now
        hit = [j for j, r in enumerate(rows) if r is not None]
        if hit:
            idx = np.array([rows[j] for j in hit], dtype=np.int64)
            np.add.at(self.counts, idx, self.decay[None, :] ** (now - clocks[hit])[:, None])

    def decay_by(self, events: float) -> None:
        """DP: decay by a public clock of `events` per batch (the number of events would move
        with one person's), counting nothing: the counts move by `release` only."""
        self.counts *= self.decay**events
        self.noise_var *= self.decay ** (2 * events)

    def hold(self, user_id: str, row: int) -> None:
        """DP: remember a row of an admitted event of a user in a gradient release."""
        self.unreleased.setdefault(user_id, []).append(row)

    def forget(self, user_id: str) -> None:
        """DP: an erased user's counts not yet released are never released."""
        self.unreleased.pop(user_id, None)

    def release(self, dp: UserLevelDP, n: int) -> None:
        """The held increments of the first `n` rows, clipped per user and noised, in one release."""
        if not self.unreleased:
            return
        self.counts[:n] += dp.noisy_counts(self.unreleased, n)[:, None]
        self.noise_var += dp.noise_multiplier**2
        self.unreleased = {}
