"""Events -> episodes -> tensors: what a training step and a user vector are computed from.

An episode is one user's context before a batch plus the batch's behaviours, with
a training target at each event. The user vector for a target at position p is
computed from behaviours [p - history, p): what the user had done before that
event, never the event itself.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.events import Event
from models.user_state import SIGNAL_CLICK, SIGNAL_SEARCH, Behaviour, UserState, rating_signal

if TYPE_CHECKING:
    from models.finetune.cooccurrence import CoOccurrence
    from models.finetune.options import FineTuneOptions


@dataclass(slots=True)
class Target:
    """A training signal inside an episode: at behaviour position `pos`, the user went to `row`."""

    pos: int
    row: int  # catalog row of the clicked/rated item
    positive: bool
    rating: float | None = None
    query: str | None = None
    hard: tuple[int, ...] = ()
    weight: float = 1.0  # in the loss (replayed targets weigh less than fresh ones)
    replayed: bool = False  # learned before: its loss is not prequential
    event_id: str = ""  # the event it came from (DP: only admitted events train)


@dataclass(slots=True)
class Episode:
    user_id: str
    behaviours: list[Behaviour]
    long_term: np.ndarray | None
    targets: list[Target] = field(default_factory=list)
    seen_rows: tuple[int, ...] = ()  # items the user had before the episode (not negatives)


@dataclass(frozen=True, slots=True)
class EpisodeTensors:
    vec: torch.Tensor  # (U, T, d) behaviour vectors, zero where padded
    signal: torch.Tensor  # (U, T) long
    ts: torch.Tensor  # (U, T) seconds since each episode's first behaviour
    valid: torch.Tensor  # (U, T) bool

    def as_args(self) -> tuple[torch.Tensor, ...]:
        return self.vec, self.signal, self.ts, self.valid


def newest_queries(episodes: Sequence[Episode], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(users, positions) of one query per episode, after all its behaviours: the current
    user vectors (`InterestNet.user`'s `qu`, `qp`)."""
    qu = torch.arange(len(episodes), device=device)
    qp = torch.as_tensor([len(ep.behaviours) for ep in episodes], dtype=torch.long, device=device)
    return qu, qp


def episode_tensors(
    episodes: Sequence[Episode],
    item_vec: torch.Tensor,
    index: Mapping[str, int],
    encode_queries: Callable[[list[str]], torch.Tensor],
) -> EpisodeTensors:
    """Behaviour tensors of `episodes`; item vectors gathered from `item_vec` by `index`
    (item id -> row of `item_vec`), search texts through `encode_queries`."""
    U = len(episodes)
    T = max(1, max(len(ep.behaviours) for ep in episodes))
    n_items = item_vec.shape[0]
    pad = -1  # a zero row appended below
    idx = np.full((U, T), pad, dtype=np.int64)
    signal = np.zeros((U, T), dtype=np.int64)
    ts = np.zeros((U, T), dtype=np.float64)
    queries: dict[str, int] = {}
    # Whole rows at a time from Python lists: element-wise numpy writes cost more than the step.
    for u, ep in enumerate(episodes):
        bs = ep.behaviours
        if not bs:
            continue
        n = len(bs)
        idx[u, :n] = [
            index.get(b.item_id, pad)
            if b.item_id is not None
            else (n_items + queries.setdefault(b.query, len(queries)) if b.query is not None else pad)
            for b in bs
        ]
        signal[u, :n] = [b.signal for b in bs]
        ts[u, :n] = [b.ts for b in bs]
        ts[u, :n] -= bs[0].ts
    valid = idx != pad
    signal[~valid] = 0
    ts[~valid] = 0.0
    parts = [item_vec]
    if queries:
        parts.append(encode_queries(list(queries)).to(item_vec.dtype))
    parts.append(torch.zeros(1, item_vec.shape[1], dtype=item_vec.dtype, device=item_vec.device))
    table = torch.cat(parts)
    idx[~valid] = table.shape[0] - 1
    dev = item_vec.device
    vec = table[torch.from_numpy(idx).to(dev).reshape(-1)].reshape(U, T, -1)
    return EpisodeTensors(
        vec,
        torch.from_numpy(signal).to(dev),
        torch.from_numpy(ts.astype(np.float32)).to(dev),
        torch.from_numpy(valid).to(dev),
    )


def chunk(ep: Episode, history: int, index: Mapping[str, int]) -> list[Episode]:
    """Split a long episode so that no chunk is longer than 2 × history: each target only
    attends over the `history` behaviours before it, so the rest is padding and waste."""
    L = history
    if len(ep.behaviours) <= 2 * L or len(ep.targets) <= 1:
        return [ep]
    out = []
    for i in range(0, len(ep.targets), L):
        group = ep.targets[i : i + L]
        start = max(0, group[0].pos - L)
        end = group[-1].pos
        before = [index.get(b.item_id) for b in ep.behaviours[:start] if b.item_id is not None]
        out.append(
            Episode(
                ep.user_id,
                ep.behaviours[start:end],
                ep.long_term,
                [replace(t, pos=t.pos - start) for t in group],
                seen_rows=ep.seen_rows + tuple(r for r in before if r is not None),
            )
        )
    return out


def lookahead_pairs(targets: Sequence[tuple[int, Target]], k: int) -> list[tuple[int, int, int]]:
    """For each fresh positive target (episode, target) in `targets`, the later fresh positives
    of the same episode at most `k` behaviours after it: (index in `targets`, their catalog
    row, their index in `targets`). The state that ranked the first also ranks them (a stored
    vector serves every event until it is next rewritten), so it is trained on them too."""
    by_episode: dict[int, list[int]] = {}
    for i, (u, t) in enumerate(targets):
        if t.positive and not t.replayed:
            by_episode.setdefault(u, []).append(i)
    out: list[tuple[int, int, int]] = []
    for idx in by_episode.values():
        idx.sort(key=lambda i: targets[i][1].pos)
        for a, i in enumerate(idx):
            p = targets[i][1].pos
            for j in idx[a + 1 :]:
                if targets[j][1].pos - p > k:
                    break
                if targets[j][1].pos > p:
                    out.append((i, targets[j][1].row, j))
    return out


def seen_mask(
    episodes: Sequence[Episode],
    targets: Sequence[tuple[int, Target]],
    n_cand: int,
    cand_pos: Mapping[int, int] | None,
    index: Mapping[str, int],
    device: torch.device,
) -> torch.Tensor:
    """(P, C) True where a candidate is an item the user already had: never a negative,
    as the evaluation never ranks items a user already has."""
    pi: list[np.ndarray] = []
    ci: list[np.ndarray] = []
    ep_rows: dict[int, np.ndarray] = {}
    for k, (u, t) in enumerate(targets):
        rows = ep_rows.get(u)
        if rows is None:
            ep = episodes[u]
            beh = [index.get(b.item_id, -1) if b.item_id is not None else -1 for b in ep.behaviours]
            rows = ep_rows[u] = np.asarray(list(ep.seen_rows) + beh, dtype=np.int64)
        cut = rows[: len(episodes[u].seen_rows) + t.pos]
        cut = cut[cut >= 0]
        if cand_pos is not None:
            cut = np.asarray([cand_pos[r] for r in cut.tolist() if r in cand_pos], dtype=np.int64)
        pi.append(np.full(len(cut), k, dtype=np.int64))
        ci.append(cut)
    mask = torch.zeros(len(targets), n_cand, dtype=torch.bool, device=device)
    if pi:
        p = torch.from_numpy(np.concatenate(pi)).to(device)
        c = torch.from_numpy(np.concatenate(ci)).to(device)
        mask[p, c] = True
    return mask


def observe_batch(
    events: Sequence[Event],
    users: dict[str, UserState],
    index: Mapping[str, int],
    live: np.ndarray,
    o: FineTuneOptions,
    *,
    profiled: Collection[str],
    cooc: CoOccurrence | None,
    rating_sums: dict[str, tuple[float, int]],
) -> tuple[list[Episode], dict[str, int], dict[str, str]]:
    """Walk the batch in time order: one episode per user (their context before the batch plus
    the batch's behaviours, with a target at each event), updating the user states in `users`,
    the co-occurrence counts and the users' rating sums as it goes.

    `index` maps item ids to catalog rows and `live` holds those rows' current vectors (the
    long-term averages move towards them). Returns the episodes, the events per user touched,
    and how each user new to `users` started (search, profile or popularity).
    """
    episodes: dict[str, Episode] = {}
    touched: dict[str, int] = {}
    cold: dict[str, str] = {}
    for e in events:
        state = users.get(e.user_id)
        if state is None:
            state = users[e.user_id] = UserState(history_len=o.history, last_ts=e.ts)
            cold[e.user_id] = (
                "search"
                if e.kind == "search" and e.query
                else "profile"
                if e.user_id in profiled
                else "popularity"
            )
            state.cold_start = cold[e.user_id]
        ep = episodes.get(e.user_id)
        if ep is None:
            seen = tuple(r for r in (index.get(i) for i in state.seen) if r is not None)
            lt = None if state.long_term is None else state.long_term.copy()
            ep = episodes[e.user_id] = Episode(e.user_id, list(state.recent), lt, seen_rows=seen)
        touched[e.user_id] = touched.get(e.user_id, 0) + 1
        row = index.get(e.target_item) if e.target_item is not None else None
        if row is not None:
            positive = e.kind != "rating" or (e.rating is not None and e.rating >= o.positive_rating)
            # What is ranked is the items a user has not had yet: a return to an item they
            # had trains no ranking (on Last.fm 7 in 10 positives are such returns).
            positive = positive and not (o.new_items_only and e.target_item in state.seen)
            hard = tuple(r for r in (index.get(i) for i in e.impressions) if r is not None and r != row)
            ep.targets.append(
                Target(
                    pos=len(ep.behaviours),
                    row=row,
                    positive=positive,
                    rating=e.rating if e.kind == "rating" else None,
                    query=e.query if e.kind == "search" else None,
                    hard=hard,
                    event_id=e.event_id,
                )
            )
        new: list[Behaviour] = []
        if e.kind == "search" and e.query:
            new.append(Behaviour(SIGNAL_SEARCH, e.ts, None, e.query, e.event_id))
        # `seen` holds every item of `recent`: most events skip the scan.
        repeat = (
            o.distinct_history
            and e.target_item in state.seen
            and any(b.item_id == e.target_item for b in state.recent)
        )
        if e.target_item is not None and not repeat:
            # Kept even when the item is not in the catalog yet: it counts once it arrives.
            new.append(Behaviour(_signal(e, o), e.ts, e.target_item, None, e.event_id))
        if row is not None and cooc is not None and e.target_item not in state.seen:
            partners = [index[b.item_id] for b in state.recent if b.item_id in index]
            cooc.add(row, partners)
        if row is not None:
            weight = 1.0
            if e.kind == "rating" and e.rating is not None:
                weight = (e.rating - o.rating_min) / max(o.rating_max - o.rating_min, 1e-9)
                s, n = rating_sums.get(e.user_id, (0.0, 0))
                rating_sums[e.user_id] = (s + e.rating, n + 1)
            rate = o.long_term_rate * weight
            if state.long_term is None:
                state.long_term = live[row].copy() * weight
            else:
                state.long_term = (1 - rate) * state.long_term + rate * live[row]
        for b in new:
            state.push(b)
            ep.behaviours.append(b)
        state.n_events += 1
        state.last_ts = max(state.last_ts, e.ts)
    return list(episodes.values()), touched, cold


def _signal(e: Event, o: FineTuneOptions) -> int:
    if e.kind == "rating" and e.rating is not None:
        return rating_signal(e.rating, o.rating_min, o.rating_max)
    return SIGNAL_SEARCH if e.kind == "search" else SIGNAL_CLICK
