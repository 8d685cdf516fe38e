"""The trainer: optimiser, losses, negative sampling, the training budget and rollback.

One step learns a group of fresh targets plus replayed sequences of recently
active users. The budget is counted in events: one step per `events_per_step`
events, whatever the size of the batches they arrive in, so a worker under
backlog learns per event what the backtest learns (it falls behind instead).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from models.catalog import Catalog
from models.device import autocast, seeded
from models.events import Event
from models.finetune.drift import DriftMonitor
from models.finetune.episodes import Episode, Target, chunk, episode_tensors, lookahead_pairs, seen_mask
from models.finetune.network import InterestNet
from models.finetune.options import FineTuneOptions
from models.finetune.versions import PER_ITEM
from models.losses import bpr, info_nce, rating_mse, softmax_rows
from models.privacy import DPConfig, UserLevelDP
from models.replay import ReplayBuffer
from models.towers import sample_live_rows
from models.user_state import UserState

log = logging.getLogger(__name__)


def rows_tensor(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(list(rows), dtype=torch.long, device=device)


class TrainingHost(Protocol):
    """What the trainer reads from the model it trains."""

    net: InterestNet
    catalog: Catalog
    users: dict[str, UserState]
    device: torch.device

    def item_vectors(
        self,
        rows: torch.Tensor,
        grad_rows: Mapping[int, float] | None,
        drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def cooc_part(self, rows: torch.Tensor) -> torch.Tensor | None: ...

    def long_tensor(self, longs: Sequence[np.ndarray | None]) -> torch.Tensor: ...

    def profile_tensor(self, user_ids: Sequence[str]) -> torch.Tensor: ...

    def user_offset(self, user_id: str) -> float: ...

    def refresh_items(self, full_tower: bool = False) -> None: ...

    def item_counts(self) -> np.ndarray: ...

    def on_user_drift(self, user_id: str) -> None: ...


class Trainer:
    def __init__(self, host: TrainingHost, opts: FineTuneOptions) -> None:
        self.host = host
        self.opts = opts
        self.rng = np.random.default_rng(opts.seed)
        # Recent positives, as references into the episodes they came from: each becomes a
        # single-target episode (with the context it had then) only when drawn.
        self.replay: ReplayBuffer[tuple[Episode, Target]] = ReplayBuffer(opts.replay_size, seed=opts.seed)
        self.steps = 0
        self.steps_since_publish = 0
        self.credit = 0.0
        self.pending: list[Episode] = []
        self.rollbacks = 0
        # Learning-rate multiplier chosen online (hypergradient): the previous update's direction.
        self._lr_mult = 1.0
        # Each parameter before the last step minus after it (minus the last update): buffers
        # reused step after step, since the per-item tables make a fresh copy cost.
        self._step_back: list[torch.Tensor] | None = None
        # Negative draws' distribution, computed once per `train` call (counts move per batch).
        self._neg_q: np.ndarray | None = None
        self._preq: list[float] = []
        self._bad_steps = 0
        self.good_state: dict[str, Any] | None = None
        self.drift = DriftMonitor(
            opts.drift_delta, boost=opts.drift_lr_boost, boost_steps=opts.drift_boost_steps
        )
        # Prequential losses of the last step's fresh targets, per user.
        self._fresh_losses: list[tuple[str, float]] = []
        # User-level DP (models/privacy.py); None = off, and then no DP code runs.
        self.dp = make_dp(opts)
        self._batched_grads = True  # DP: per-user gradients in one vmapped backward pass
        self._dp_grads: dict[str, Sequence[torch.Tensor | None]] = {}
        self.released_users: set[str] = set()  # DP: who took part in the last release
        self.make_optimizer()

    # ---- optimiser ----------------------------------------------------------------------------
    def make_optimizer(self) -> None:
        decay, no_decay, items, layers = [], [], [], []
        for name, p in self.host.net.named_parameters():
            if not p.requires_grad:
                continue
            # Biases, scales and sparse per-item rows are not decayed: decay would shrink
            # every item's row on every step, also the items the batch never saw.
            if name.startswith(("item_", "rating_bias")):
                items.append(p)
            elif name.startswith("tower.top."):
                layers.append(p)
            else:
                (no_decay if p.ndim < 2 else decay).append(p)
        o = self.opts
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": o.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
                # Each item's row sees few steps in one pass over a stream: it gets a larger rate.
                {"params": items, "weight_decay": 0.0, "lr": o.lr * o.item_lr_multiplier, "eps": o.item_eps},
                # Pretrained transformer weights (top_layers/lora) move slowly: their outputs are
                # cached between refreshes, and a large rate undoes the pretraining.
                {"params": layers, "weight_decay": o.weight_decay, "lr": self._layer_lr()},
            ],
            lr=o.lr,
            # One kernel per parameter group instead of a dozen small ops per tensor (the same
            # numbers): the per-tensor loop was ~5% of a CPU step under cProfile.
            fused=self.host.device.type in ("cpu", "cuda"),
        )
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]

    def _layer_lr(self) -> float:
        o = self.opts
        mult = (
            o.lora_lr_multiplier if self.host.net.tower.strategy.startswith("lora") else o.layer_lr_multiplier
        )
        return o.lr * mult

    def add_params(self, params: list[nn.Parameter]) -> None:
        self.optimizer.add_param_group({"params": params, "weight_decay": self.opts.weight_decay})
        self._base_lrs.append(self.opts.lr)

    def _set_lr_multiplier(self, mult: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * mult

    def swap_param(self, old: nn.Parameter, new: nn.Parameter, grown: tuple[int, ...]) -> None:
        """`new` replaces `old` (a per-item table grown by zero rows), keeping its Adam moments."""
        state = self.optimizer.state.pop(old, None)
        for group in self.optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = torch.cat([state[key], torch.zeros(*grown, device=new.device)])
            self.optimizer.state[new] = state

    # ---- the budget -------------------------------------------------------------------------------
    def add(self, episodes: Sequence[Episode]) -> None:
        self.pending.extend(ep for ep in episodes if ep.targets)
        # Counted in positives, a long run of events without one pays for no step: keep the
        # waiting targets bounded (the oldest go first).
        waiting = sum(len(ep.targets) for ep in self.pending)
        while waiting > self.opts.replay_size and len(self.pending) > 1:
            waiting -= len(self.pending.pop(0).targets)

    def paid_for(self, events: Sequence[Event], episodes: Sequence[Episode]) -> int:
        """What a batch pays into the budget: every event, or (`budget_unit="positives"`) the
        targets of its episodes that train ranking."""
        if self.opts.budget_unit == "positives":
            return sum(self.budget_units(ep) for ep in episodes)
        return len(events)

    def budget_units(self, ep: Episode) -> int:
        """What an episode counts against the budget: its targets, or (`budget_unit="positives"`)
        only those that train ranking."""
        if self.opts.budget_unit == "positives":
            return sum(1 for t in ep.targets if t.positive)
        return len(ep.targets)

    def steps_due(self, n_events: int) -> int:
        return int((self.credit + n_events) // self.opts.events_per_step)

    def _groups(self) -> list[list[Episode]]:
        """The pending episodes cut into groups of about `events_per_step` targets (one per step)."""
        E = self.opts.events_per_step
        index = self.host.catalog.index
        groups: list[list[Episode]] = []
        cur: list[Episode] = []
        n = 0
        for ep in self.pending:
            for part in chunk(ep, self.opts.history, index):
                cur.append(part)
                n += self.budget_units(part)
                if n >= E:
                    groups.append(cur)
                    cur, n = [], 0
        if cur:
            groups.append(cur)
        return groups

    def train(self, n_events: int, device: torch.device) -> float | None:
        """Take the steps `n_events` more events pay for; returns the first fresh step's loss."""
        self._neg_q = None  # the counts moved since the last call
        if self.dp is not None:
            return self._dp_train(device)
        o = self.opts
        steps = self.steps_due(n_events)
        self.credit += n_events - steps * o.events_per_step
        if steps == 0:
            return None
        groups = self._groups()
        # Left for the next call (only when the events carried more targets than steps).
        self.pending = [ep for g in groups[steps:] for ep in g]
        first: float | None = None
        for k in range(steps):
            fresh = groups[k] if k < len(groups) else []
            replayed = self._replayed(o.replay_per_step)
            n_fresh = sum(len(ep.targets) for ep in fresh)
            n_replay = sum(len(ep.targets) for ep in replayed)
            if n_fresh and n_replay:
                # Replay consolidates, the fresh events carry the news: together the replayed
                # targets weigh `replay_weight` times the fresh ones, however many there are.
                w = o.replay_weight * n_fresh / n_replay
                for ep in replayed:
                    ep.targets = [replace(t, weight=w) for t in ep.targets]
            batch = fresh + replayed
            if not batch:
                continue
            # Dropout draws from a generator seeded by (seed, step number): the numbers depend
            # on the data alone, not on what else ran in the process before.
            if o.drift or o.lr_hypergradient > 0:
                self._set_lr_multiplier(self._lr_mult * (self.drift.lr_multiplier if o.drift else 1.0))
            with seeded(device, o.seed * 1_000_003 + self.steps):
                loss = self.step(batch)
            self.steps += 1
            self.steps_since_publish += 1
            drifted = self._watch_drift() if o.drift else False
            if fresh:
                self.replay.extend((ep, t) for ep in fresh for t in ep.targets if t.positive)
                if math.isfinite(loss):
                    if first is None:
                        first = loss
                    # A loss that rose because interests moved is not training gone bad:
                    # rolling back would restore weights fitted to the old interests.
                    if not drifted:
                        self.check_rollback(loss)
        return first

    def _watch_drift(self) -> bool:
        """Feed the step's prequential losses to the drift detectors and act on a drift;
        True when the stream or a user drifted."""
        self.drift.step_done()
        if not self._fresh_losses:
            return False
        stream = self.drift.global_loss(float(np.mean([x for _, x in self._fresh_losses])))
        users = {uid for uid, x in self._fresh_losses if self.drift.user_loss(uid, x)}
        for uid in users:
            self.host.on_user_drift(uid)
        return stream or bool(users)

    def _replayed(self, n: int) -> list[Episode]:
        """`n` earlier positives, each with the behaviours the user had before it then.
        (Replaying users' current sequences with a target at every position instead,
        `episodes.replay_episode`, scored lower on ML-100K: 0.0486 vs 0.0541 NDCG@10 on the
        last 20% of the first 30,000 events; it over-weighs the newest behaviours.)"""
        L = self.opts.history
        out = []
        for ep, t in self.replay.sample(n):
            ctx = ep.behaviours[max(0, t.pos - L) : t.pos]
            out.append(Episode(ep.user_id, ctx, ep.long_term, [replace(t, pos=len(ctx), replayed=True)]))
        return out

    # ---- one step --------------------------------------------------------------------------------
    def _candidates(
        self, pos: Sequence[tuple[int, Target]], n: int
    ) -> tuple[list[int], set[int] | None, set[int], np.ndarray | None]:
        """Candidate rows of the softmax: the whole catalog when it is small, else the targets,
        their impressions and drawn negatives. Returns the rows, the set of rows always
        included, the draws, and each row's log-Q correction (None = the whole catalog).

        Draws mix a uniform share with one proportional to count^0.75 (word2vec's): uniform
        draws alone rarely meet the popular items that crowd a user's top of the list, and on
        Last.fm (12,500 artists, 1,024 draws) the model then ranked below popularity."""
        o = self.opts
        if n <= o.full_softmax_max:
            return list(range(n)), None, set(), None
        fixed = {t.row for _, t in pos}
        for _, t in pos:
            fixed.update(t.hard)
        k = o.random_negatives
        mix = o.popular_negatives if self.dp is None else 0.0  # DP: draws that no count moves
        q = self._neg_q
        if q is None or len(q) != n:
            q = np.full(n, 1.0 / n)
            if mix > 0:
                w = np.maximum(self.host.item_counts()[:n], 0.0) ** 0.75
                if w.sum() > 0:
                    q = (1.0 - mix) * q + mix * w / w.sum()
            self._neg_q = q
        drawn = (
            {int(r) for r in self.rng.choice(n, size=k, p=q)}
            if mix > 0
            else {int(r) for r in self.rng.integers(0, n, size=k)}
        )
        rows = sorted(fixed | drawn)
        # Each drawn row stands for 1 / (k q) rows of the catalog; the always-included rows
        # count once, as in the full softmax.
        corr = np.array([0.0 if r in fixed else -math.log(k * q[r]) for r in rows])
        return rows, fixed, drawn, corr

    def step(self, episodes: Sequence[Episode]) -> float:
        """One optimisation step over the targets of `episodes`; returns the loss before the update."""
        o = self.opts
        host = self.host
        net = host.net
        n = len(host.catalog)
        index = host.catalog.index
        episodes = [c for ep in episodes for c in chunk(ep, o.history, index)]
        self._fresh_losses = []
        flat = [(u, t) for u, ep in enumerate(episodes) for t in ep.targets]
        pos = [(u, t) for u, t in flat if t.positive]
        if not flat:
            return float("nan")
        cand_rows, fixed, drawn_rows, log_q = self._candidates(pos, n)
        full = fixed is None
        own = {t.row for _, t in flat}  # the batch's own items: targets and contexts
        for ep in episodes:
            for b in ep.behaviours:
                r = index.get(b.item_id) if b.item_id is not None else None
                if r is not None:
                    own.add(r)
        need_rows = sorted(set(cand_rows) | own)
        col = {r: i for i, r in enumerate(need_rows)}
        # A cheap tower (the adapter) runs with gradients over every candidate: the negatives'
        # gradients through it are worth it (ML-100K NDCG@10 0.0569 vs 0.0515 with gradients
        # on the batch's own items only). Transformer layers run on a weighted sample of the
        # targets and the other candidates (`sample_live_rows`); the rest come from the cache.
        grad_rows: dict[int, float] | None = None
        if not net.tower.cheap:
            targets = list(dict.fromkeys(t.row for _, t in pos))
            grad_rows = sample_live_rows(targets, cand_rows, o.tower_items_per_step, self.rng)

        dev = host.device
        # ---- DP: each loss term per row, with the user (index) it belongs to ----
        dp = self.dp
        terms: list[tuple[float, torch.Tensor, torch.Tensor]] = []
        user_index: dict[str, int] = {}
        for ep in episodes:
            user_index.setdefault(ep.user_id, len(user_index))

        def who(idx: Sequence[int]) -> torch.Tensor:
            return rows_tensor([user_index[episodes[flat[i][0]].user_id] for i in idx], dev)

        # ---- end DP ----
        drop = None
        if o.id_dropout > 0 and dp is None:
            drop = torch.from_numpy(self.rng.random(len(need_rows)) < o.id_dropout).to(dev)
        net.train()
        with autocast(dev, o.bf16):
            need_t = rows_tensor(need_rows, dev)
            vec, bias = host.item_vectors(need_t, grad_rows, drop)
            # A replayed target's own event is in the co-occurrence counts by now: scored with
            # them, it would teach the model to trust co-occurrence far more than a fresh event
            # (where it is never in them) bears out. Replayed targets see the item vectors
            # without it, in their history and among the candidates alike.
            blind = [i for i, (_, t) in enumerate(flat) if t.replayed]
            cooc = host.cooc_part(need_t) if blind else None
            if cooc is None:
                blind = []
                bvec, bbias = vec, bias
            else:
                bvec, bbias = vec - cooc, bias - cooc @ net.w_text
            u_all = self._user_states(episodes, flat, vec, col, blind, bvec)  # in `flat`'s order
            is_blind = torch.zeros(len(flat), dtype=torch.bool, device=dev)
            is_blind[rows_tensor(blind, dev)] = True
            scale = net.log_scale.exp()
            losses: list[torch.Tensor] = []
            pos_idx = [i for i, (_, t) in enumerate(flat) if t.positive]
            if pos_idx:
                up = u_all[pos_idx]
                cand_cols = rows_tensor([col[r] for r in cand_rows], dev)
                cand_bias = bias[cand_cols]
                logits = scale * (up @ vec[cand_cols].T) + cand_bias
                blind_set = set(blind)
                blind_pos = [k for k, i in enumerate(pos_idx) if i in blind_set]
                if blind_pos:
                    b = rows_tensor(blind_pos, dev)
                    rows_b = scale * (up[b] @ bvec[cand_cols].T) + bbias[cand_cols]
                    logits = logits.index_put((b,), rows_b.to(logits.dtype))
                if full:
                    cand_pos = None
                    target = rows_tensor([flat[i][1].row for i in pos_idx], dev)
                else:
                    assert fixed is not None
                    cand_pos = {r: i for i, r in enumerate(cand_rows)}
                    target = rows_tensor([cand_pos[flat[i][1].row] for i in pos_idx], dev)
                    # Sampled softmax with a log-Q correction: each uniform draw stands for
                    # (N - targets) / draws items of the catalog, so the loss estimates the full
                    # softmax at any catalog size instead of one that shrinks as it grows.
                    if dp is None:
                        assert log_q is not None
                        logits = logits + torch.from_numpy(log_q).to(dev, logits.dtype)
                    else:
                        # DP: which rows are corrected, and by how much, must not depend on the
                        # other users' targets (`fixed`): the draws and the catalog size only.
                        is_drawn = [r in drawn_rows for r in cand_rows]
                        corr = math.log(max(1, n) / max(1, o.random_negatives))
                        drawn = torch.tensor(is_drawn, dtype=torch.bool, device=dev)
                        logits = logits + drawn.to(logits.dtype) * corr
                mask = seen_mask(episodes, [flat[i] for i in pos_idx], len(cand_rows), cand_pos, index, dev)
                if dp is not None and cand_pos is not None:
                    # DP: another user's positives or impressions are not this user's negatives
                    # (their presence would change this user's term: sensitivity beyond `clip`).
                    mask |= self._dp_foreign_mask([flat[i][1] for i in pos_idx], cand_pos, drawn_rows)
                if o.loss == "bpr":
                    pos_logit = logits.gather(1, target[:, None]).squeeze(1)
                    valid = ~mask
                    valid[torch.arange(len(target)), target] = False
                    if dp is not None:
                        terms.append((1.0, bpr(pos_logit, logits, valid, per_row=True), who(pos_idx)))
                    else:
                        losses.append(bpr(pos_logit, logits, valid))
                elif dp is not None:
                    rows = softmax_rows(logits.float(), target, mask)
                    terms.append((1.0, rows, who(pos_idx)))
                    self._fresh_losses = [
                        (episodes[flat[i][0]].user_id, x)
                        for i, x in zip(pos_idx, rows.detach().cpu().tolist(), strict=True)
                    ]
                else:
                    w = torch.tensor([flat[i][1].weight for i in pos_idx], device=dev)
                    rows = softmax_rows(logits.float(), target, mask)
                    ahead = self._lookahead(flat, pos_idx, logits, cand_bias, mask, cand_pos)
                    if ahead is None:
                        losses.append((rows * w).sum() / w.sum().clamp(min=1e-12))
                    else:
                        aw = w[ahead[1]] * o.lookahead_weight
                        total = (rows * w).sum() + (ahead[0] * aw).sum()
                        losses.append(total / (w.sum() + aw.sum()).clamp(min=1e-12))
                    fresh_rows = rows.detach().cpu().tolist()
                    self._fresh_losses = [
                        (episodes[flat[i][0]].user_id, x)
                        for i, x in zip(pos_idx, fresh_rows, strict=True)
                        if not flat[i][1].replayed
                    ]
                # Impressions shown but not clicked: a pairwise push below the clicked item.
                hp, hn = [], []
                for k, i in enumerate(pos_idx):
                    for r in flat[i][1].hard:
                        c = r if cand_pos is None else cand_pos.get(r)
                        if c is not None:
                            hp.append(k)
                            hn.append(c)
                if hp and o.hard_negative_weight > 0:
                    hp_t = rows_tensor(hp, dev)
                    pos_logit = logits.gather(1, target[:, None]).squeeze(1)[hp_t]
                    neg_logit = logits[hp_t, rows_tensor(hn, dev)]
                    if dp is not None:
                        pair = bpr(pos_logit, neg_logit[:, None], per_row=True)
                        terms.append((o.hard_negative_weight, pair, who([pos_idx[k] for k in hp])))
                    else:
                        losses.append(o.hard_negative_weight * bpr(pos_logit, neg_logit[:, None]))
            rated = [i for i, (_, t) in enumerate(flat) if t.rating is not None]
            if rated and o.rating_weight > 0:
                tcols = rows_tensor([col[flat[i][1].row] for i in rated], dev)
                trows = rows_tensor([flat[i][1].row for i in rated], dev)
                ub = torch.tensor([host.user_offset(episodes[flat[i][0]].user_id) for i in rated], device=dev)
                rated_t = rows_tensor(rated, dev)
                item = torch.where(is_blind[rated_t, None], bvec[tcols], vec[tcols])
                dots = (u_all[rated_t] * item).sum(-1)
                pred = net.mu + ub + net.rating_bias[trows] + net.rating_scale * dots
                truth = torch.tensor([flat[i][1].rating for i in rated], device=dev)
                if dp is not None:
                    terms.append((o.rating_weight, (pred.float() - truth) ** 2, who(rated)))
                else:
                    losses.append(o.rating_weight * rating_mse(pred.float(), truth))
            searched = [i for i, (_, t) in enumerate(flat) if t.query]
            # DP: no in-batch contrastive term (each query's negatives are other users' items);
            # a search that led to a click still trains as that user's positive above.
            if dp is None and len(searched) >= 2 and o.search_weight > 0:
                qv = net("texts", [flat[i][1].query for i in searched])  # type: ignore[arg-type]
                tcols = rows_tensor([col[flat[i][1].row] for i in searched], dev)
                losses.append(o.search_weight * info_nce(qv, vec[tcols]))  # type: ignore[arg-type]
            if dp is not None:
                return self._dp_step(terms, user_index)
            if not losses:
                return float("nan")
            loss = torch.stack([x.float() for x in losses]).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if o.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
        before = None
        if o.lr_hypergradient > 0:
            self._adapt_lr(params)
            before = self._keep_params(params)
        self.optimizer.step()
        if before is not None:
            torch._foreach_sub_(before, [p.detach() for p in params])
            self._step_back = before
        return float(loss.detach())

    def _user_states(
        self,
        episodes: Sequence[Episode],
        targets: Sequence[tuple[int, Target]],
        vec: torch.Tensor,
        col: Mapping[int, int],
        blind: Sequence[int] = (),
        blind_vec: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The user vector each of `targets` (episode, target) is ranked by, its episode's
        behaviours read from `vec` (the step's item vectors, catalog row r at `col[r]`); the
        targets at indices `blind` read theirs from `blind_vec` (their episodes hold no other
        targets: a replayed target has an episode of its own)."""
        if not blind or blind_vec is None:
            return self._states_of(episodes, targets, vec, col)
        seen = set(blind)
        order: list[int] = []
        parts = []
        fresh = [i for i in range(len(targets)) if i not in seen]
        for idx, table in ((fresh, vec), (list(blind), blind_vec)):
            if not idx:
                continue
            eps = sorted({targets[i][0] for i in idx})
            at = {u: k for k, u in enumerate(eps)}
            mine = [(at[targets[i][0]], targets[i][1]) for i in idx]
            parts.append(self._states_of([episodes[e] for e in eps], mine, table, col))
            order += idx
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.as_tensor(order)] = torch.arange(len(order))
        return torch.cat(parts)[back.to(vec.device)]

    def _states_of(
        self,
        episodes: Sequence[Episode],
        targets: Sequence[tuple[int, Target]],
        vec: torch.Tensor,
        col: Mapping[int, int],
    ) -> torch.Tensor:
        host, net = self.host, self.host.net
        dev = vec.device
        ids = host.catalog.ids
        t = episode_tensors(
            episodes,
            vec,
            {ids[r]: c for r, c in col.items()},
            lambda texts: net("texts", texts),  # type: ignore[arg-type,return-value]
        )
        u, _ = net.user(
            *t.as_args(),
            rows_tensor([u for u, _ in targets], dev),
            rows_tensor([tg.pos for _, tg in targets], dev),
            host.long_tensor([ep.long_term for ep in episodes]),
            host.profile_tensor([ep.user_id for ep in episodes]),
        )
        return u

    def _lookahead(
        self,
        flat: Sequence[tuple[int, Target]],
        pos_idx: Sequence[int],
        logits: torch.Tensor,
        cand_bias: torch.Tensor,
        mask: torch.Tensor,
        cand_pos: Mapping[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cross-entropies of the later positives each fresh target's state also ranks
        (`lookahead_pairs`), from that state's own logits row, and the row (in `pos_idx`'s
        order) of each; None when there are none. These train the interest part only: the
        biases stay the prior a user without history is served, learned from each event's
        own state (with them, the ML-100K cold-start slice lost a quarter)."""
        o = self.opts
        if o.lookahead_targets <= 0:
            return None
        pairs = lookahead_pairs([flat[i] for i in pos_idx], o.lookahead_targets)
        if not pairs:
            return None
        dev = logits.device
        rows = sorted({k for k, _, _ in pairs})
        at = {k: n for n, k in enumerate(rows)}
        rows_t = rows_tensor(rows, dev)
        interest = (logits[rows_t] - cand_bias + cand_bias.detach()).float()
        row_mask = mask[rows_t]
        which = rows_tensor([at[k] for k, _, _ in pairs], dev)
        cols = rows_tensor([r if cand_pos is None else cand_pos[r] for _, r, _ in pairs], dev)
        keep = ~row_mask[which, cols]  # an item the state had already is no target of it
        # Each row's log-normaliser once, then every pair's cross-entropy from it.
        lse = torch.logsumexp(interest.masked_fill(row_mask, torch.finfo(interest.dtype).min / 2), dim=1)
        ce = lse[which] - interest[which, cols]
        owner = rows_tensor([k for k, _, _ in pairs], dev)
        return ce[keep], owner[keep]

    def _keep_params(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of `params` in the buffers of the last step where the shapes still fit."""
        old = self._step_back if self._step_back is not None and len(self._step_back) == len(params) else None
        out = []
        for i, p in enumerate(params):
            buf = old[i] if old is not None else None
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
                out.append(p.detach().clone())
            else:
                out.append(buf.copy_(p.detach()))
        return out

    def _adapt_lr(self, params: Sequence[torch.Tensor]) -> None:
        """Hypergradient learning rate (Baydin et al. 2018), multiplicative: when this step's
        gradient (on events not yet learned: prequential) still points along the last update,
        the rate was too small; when it points back, too large."""
        prev = self._step_back
        if prev is None or len(prev) != len(params):
            return
        dot = 0.0
        gn = 0.0
        un = 0.0
        for p, back in zip(params, prev, strict=True):
            if p.grad is None or p.shape != back.shape:  # a per-item table grew: skip it once
                continue
            g = p.grad.float()
            dot += float((g * back).sum())
            gn += float((g * g).sum())
            un += float((back * back).sum())
        if gn <= 0 or un <= 0:
            return
        # The gradient along the last update, i.e. against `back`.
        cos = dot / math.sqrt(gn * un)
        lo, hi = self.opts.lr_hypergradient_range
        self._lr_mult = min(max(self._lr_mult * math.exp(self.opts.lr_hypergradient * cos), lo), hi)

    # ---- DP (models/privacy.py, docs/privacy.md) -------------------------------------------------
    def _dp_train(self, device: torch.device) -> float | None:
        """Under DP: one release over the batch's admitted targets, whatever the events-counted
        budget says (the budget's cut points move with one user's events; a batch's do not).
        No replay (a replayed event would take its user into more releases than the cap
        allows), no rollback and no learning-rate boost (data-dependent choices of what is
        released that the accountant does not cover)."""
        dp = self.dp
        assert dp is not None
        batch, self.pending = self.pending, []
        self.credit = 0.0
        if dp.exhausted:
            return None
        cap = dp.config.max_participations
        batch = [ep for ep in batch if ep.targets and dp.participated(ep.user_id) < cap]
        if not batch:
            return None
        with seeded(device, self.opts.seed * 1_000_003 + self.steps):
            loss = self._dp_learn(batch)
        if not self.released_users:
            return None
        self.steps += 1
        self.steps_since_publish += 1
        if self.opts.drift:
            self._watch_user_drift()
        return loss

    def _watch_user_drift(self) -> None:
        """Under DP only users' own drift: it changes what that user contributes (clipped as
        theirs), never the learning rate of a release."""
        for uid in {uid for uid, x in self._fresh_losses if self.drift.user_loss(uid, x)}:
            self.host.on_user_drift(uid)

    def _dp_params(self) -> list[torch.Tensor]:
        """Shared parameters trained under DP. Per-item rows stay frozen (at zero): noise on
        every row of a sparse table would swamp the few users who touched a row, and each row
        would drift by Adam's step size every step (docs/privacy.md)."""
        return [
            p
            for name, p in self.host.net.named_parameters()
            if p.requires_grad and not name.startswith(PER_ITEM)
        ]

    def _dp_step(
        self, terms: Sequence[tuple[float, torch.Tensor, torch.Tensor]], users: Mapping[str, int]
    ) -> float:
        """Per-user losses -> per-user gradients, kept for `_dp_learn` (which releases them)."""
        if not terms:
            return float("nan")
        dev = self.host.device
        n_users = len(users)
        per_user = torch.zeros(n_users, device=dev)
        for weight, rows, owner in terms:
            # Each user's mean of each term: a user's weight does not grow with their events.
            zero = torch.zeros(n_users, device=dev)
            sums = zero.index_add(0, owner, rows.float())
            counts = zero.index_add(0, owner, torch.ones_like(rows.float()))
            per_user = per_user + weight * sums / counts.clamp(min=1.0)
        grads = self._per_user_grads(per_user, self._dp_params())
        for uid, i in users.items():
            self._dp_grads[uid] = grads[i]
        return float(per_user.detach().mean())

    def _dp_learn(self, episodes: Sequence[Episode]) -> float:
        """One DP release: per-user gradients over passes of at most `dp_pass_budget`
        users × targets (memory stays bounded), then clipped, summed, noised, one optimizer step."""
        dp = self.dp
        assert dp is not None
        self.released_users = set()
        by_user: dict[str, list[Episode]] = {}
        for ep in episodes:
            by_user.setdefault(ep.user_id, []).append(ep)
        self._dp_grads = {}
        losses = []
        fresh: list[tuple[str, float]] = []
        passes: list[list[Episode]] = [[]]
        n_users = n_targets = 0
        for eps in by_user.values():
            t = sum(len(ep.targets) for ep in eps)
            if passes[-1] and (n_users + 1) * (n_targets + t) > self.opts.dp_pass_budget:
                passes.append([])
                n_users = n_targets = 0
            passes[-1].extend(eps)
            n_users += 1
            n_targets += t
        for part in passes:
            loss = self.step(part)
            fresh.extend(self._fresh_losses)
            if math.isfinite(loss):
                losses.append(loss)
        self._fresh_losses = fresh
        grads, self._dp_grads = self._dp_grads, {}
        if not grads:
            return float("nan")
        if not dp.may_release(grads):
            log.warning(
                "DP budget spent (epsilon %.3f of %s): shared parameters are frozen from now on",
                dp.epsilon,
                dp.config.epsilon,
            )
            return float("nan")
        params = self._dp_params()
        noisy = dp.privatize(list(grads.values()), params)
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, noisy, strict=True):
            p.grad = g.to(p.dtype)
        self.optimizer.step()
        dp.record(grads)
        self.released_users = set(grads)
        return float(np.mean(losses)) if losses else float("nan")

    def _per_user_grads(
        self, per_user: torch.Tensor, params: Sequence[torch.Tensor]
    ) -> list[Sequence[torch.Tensor | None]]:
        """Each user's gradient of `params`: one batched backward pass (vmap over the rows of an
        identity), or one pass per user where an op has no batching rule."""
        n = len(per_user)
        if self._batched_grads:
            try:
                eye = torch.eye(n, device=per_user.device, dtype=per_user.dtype)
                stacked = torch.autograd.grad(
                    per_user,
                    params,
                    grad_outputs=eye,
                    is_grads_batched=True,
                    allow_unused=True,
                    retain_graph=True,
                )
                return [[None if g is None else g[i] for g in stacked] for i in range(n)]
            except RuntimeError as exc:
                log.info("DP: per-user gradients one user at a time (%s)", str(exc).splitlines()[0][:120])
                self._batched_grads = False
        return [
            torch.autograd.grad(per_user[i], params, retain_graph=i < n - 1, allow_unused=True)
            for i in range(n)
        ]

    def _dp_foreign_mask(
        self, targets: Sequence[Target], cand_pos: Mapping[int, int], drawn: set[int]
    ) -> torch.Tensor:
        """(P, C) True on candidates that are neither random draws nor the row's own impressions."""
        dev = self.host.device
        allowed = torch.zeros(len(targets), len(cand_pos), dtype=torch.bool, device=dev)
        if drawn:
            allowed[:, rows_tensor([cand_pos[r] for r in drawn], dev)] = True
        for k, t in enumerate(targets):
            own = [cand_pos[r] for r in t.hard if r in cand_pos]
            if own:
                allowed[k, rows_tensor(own, dev)] = True
        return ~allowed

    # ---- prequential rollback ------------------------------------------------------------------
    def check_rollback(self, loss: float) -> None:
        """When a step's loss (before learning it) exceeds the rolling mean by
        `rollback_threshold` for `rollback_patience` steps, restore the last good weights."""
        o = self.opts
        window = self._preq[-o.rollback_window :]
        if len(window) >= max(3, o.rollback_window // 2):
            baseline = float(np.mean(window))
            if loss > baseline * (1 + o.rollback_threshold):
                self._bad_steps += 1
            else:
                self._bad_steps = 0
            if self._bad_steps >= o.rollback_patience and self.good_state is not None:
                log.warning(
                    "prequential loss %.4f is %.0f%% above its rolling mean %.4f for %d steps: "
                    "rolling back to the last good weights",
                    loss,
                    100 * (loss / baseline - 1),
                    baseline,
                    self._bad_steps,
                )
                self.restore(self.good_state)
                self.rollbacks += 1
                self._bad_steps = 0
                self._preq.clear()
                return
        self._preq.append(loss)

    def capture(self) -> dict[str, Any]:
        return {
            "net": copy.deepcopy(self.host.net.state_dict()),
            "opt": copy.deepcopy(self.optimizer.state_dict()),
            "n": len(self.host.catalog),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        net = self.host.net
        n_now = len(self.host.catalog)
        state = saved["net"]
        n_then = saved["n"]
        if n_now > n_then:  # items that arrived since keep zero rows
            for key in ("item_emb", "item_bias", "rating_bias"):
                cur = getattr(net, key)
                state = {**state, key: torch.cat([state[key], torch.zeros_like(cur.data[n_then:])])}
        net.load_state_dict(state, strict=False)
        self.make_optimizer()
        self.host.refresh_items(full_tower=True)


def make_dp(o: FineTuneOptions) -> UserLevelDP | None:
    cfg = DPConfig(
        epsilon=o.dp_epsilon,
        delta=o.dp_delta,
        noise_multiplier=o.dp_noise_multiplier,
        clip=o.dp_clip,
        max_events_per_window=o.dp_max_events_per_window,
        window_s=o.dp_window_s,
        max_participations=o.dp_max_participations,
        accountant=o.dp_accountant,
    )
    if not cfg.enabled:
        return None
    # Two releases per step where item popularity is counted: the gradient and the counts.
    releases = 2 if o.popularity_half_lives_events else 1
    return UserLevelDP(cfg, releases_per_step=releases, expected_users=o.dp_expected_users, seed=o.seed)
