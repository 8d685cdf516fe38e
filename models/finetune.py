"""The fine-tuned interest model: incremental training against the pretrained base.

Scoring (what `predict` ranks by, and what the published vectors reproduce with
a plain inner product):

    score(user, item) = s · u·e_item + β_item
    e_item = P(tower(text) [+ F(other-modality embedding)]) + r_item
    β_item = b_item + w_pop · log(1 + time-decayed count of the item)
    u      = W_s · attention(recent behaviours) + W_l · long-term average + W_p · profile

`tower` is the fine-tuning strategy (adapter / top_layers:k / lora:r, see
`models.towers`), P a projection shared by items, queries and profiles, r_item a
residual ID embedding that starts at zero (items with much behaviour learn
collaborative signal, new items fall back on their text), b_item a learned
bias. Published item vectors are [e_item, β_item] and user vectors [s·u, 1], so
`SELECT ... ORDER BY vector <#> user_vector` ranks exactly like `predict`.

Training and serving are kept apart: the published item vectors and every user
vector written against them come from the weights of the published version
(`_serving`), while the optimiser moves the live weights. Between publishes a
user's vector still follows each new behaviour at once; only the weights wait
for the next publish (every N batches or T seconds).

Each batch is learned after it was predicted (predict-then-learn): for every
positive event the user vector is built from the behaviours *before* it, and the
clicked/rated item must win a softmax against the catalog (or, for large
catalogs, against in-batch, random and impression negatives).
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from models.catalog import Catalog, TextEncoder, item_text
from models.core import BatchResult, InterestModel, ModelSnapshot, UserUpdate
from models.device import autocast, cpu_threads, pick_device, set_deterministic
from models.events import Event, Item, UserProfile
from models.losses import bpr, info_nce, rating_mse, sampled_softmax
from models.privacy import DPConfig, UserLevelDP
from models.replay import ReplayBuffer
from models.towers import ItemTower, build_tower, sample_live_rows
from models.user_state import (
    N_SIGNALS,
    SIGNAL_CLICK,
    SIGNAL_SEARCH,
    Behaviour,
    UserState,
    rating_signal,
)

log = logging.getLogger(__name__)


@dataclass
class FineTuneOptions:
    """Hyperparameters; every field can be set through `build_model(..., field=value)`."""

    # Interest dimension; 0/None = the base's. 64 learns as well on MovieLens and runs ~6x faster.
    dim: int | None = 64
    history: int = 50  # recent behaviours attended over
    lr: float = 3e-3
    item_lr_multiplier: float = 1.0
    weight_decay: float = 1e-5
    dropout: float = 0.1
    clip_norm: float = 5.0
    steps_per_batch: int = 1
    adapter_hidden: int = 128
    lora_layers: int = 2
    # Negatives: the whole catalog when it has at most `full_softmax_max` items, else
    # in-batch positives + `random_negatives` uniform draws + the event's impressions.
    full_softmax_max: int = 5000
    random_negatives: int = 256
    loss: str = "softmax"  # or "bpr"
    positive_rating: float = 4.0
    rating_min: float = 0.5
    rating_max: float = 5.0
    rating_weight: float = 0.05
    search_weight: float = 0.5
    hard_negative_weight: float = 0.5
    # Item popularity enters the score as log(1 + time-decayed count) at two speeds.
    popularity_half_lives_s: tuple[float, ...] = (86400.0, 30 * 86400.0)
    long_term_rate: float = 0.05
    # top_layers/lora: at most this many items run through the trained layers per step (a
    # weighted sample of the targets and the other candidates, `models.towers.sample_live_rows`).
    tower_items_per_step: int = 128
    # Learning rate of the trained transformer layers (top_layers) / LoRA adapters, times `lr`.
    layer_lr_multiplier: float = 0.01
    lora_lr_multiplier: float = 0.1
    tower_refresh_every: int = 10  # publishes between full re-encodings of the catalog (top_layers/lora)
    replay_size: int = 20_000
    replay_per_batch: int = 64
    # Prequential rollback: when a batch's loss (before learning it) exceeds the rolling
    # mean by this fraction for `rollback_patience` batches, restore the last good weights.
    rollback_threshold: float = 0.5
    rollback_patience: int = 3
    rollback_window: int = 20
    publish_every_batches: int = 10
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
    # The clipped, noised sum is divided by this public constant (not the step's user count,
    # which depends on who took part); Adam makes the learning rate nearly independent of it.
    dp_expected_users: float = 16.0
    dp_accountant: str = "prv"
    # Under DP a batch is learned in forward passes of at most this many (users × targets):
    # per-user gradients (one vmapped backward pass) hold a copy of the pass's logits per user.
    # One release per batch whatever the passes.
    dp_pass_budget: int = 4096

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> FineTuneOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown model option(s): {', '.join(unknown)}")
        return cls(**kwargs)


@dataclass(slots=True)
class Target:
    """A training signal inside an episode: at behaviour position `pos`, the user went to `row`."""

    pos: int
    row: int  # catalog row of the clicked/rated item
    positive: bool
    rating: float | None = None
    query: str | None = None
    hard: tuple[int, ...] = ()
    event_id: str = ""  # the event it came from (DP: only admitted events train)


@dataclass(slots=True)
class Episode:
    """One user's context before a batch plus the batch's behaviours, with the targets inside it.

    The user vector for a target at position p attends over behaviours [p - history, p):
    what the user had done before that event, never the event itself.
    """

    user_id: str
    behaviours: list[Behaviour]
    long_term: np.ndarray | None
    targets: list[Target] = field(default_factory=list)
    seen_rows: tuple[int, ...] = ()  # items the user had before the episode (not negatives)


class InterestNet(nn.Module):
    def __init__(self, tower: ItemTower, dim: int, history: int, dropout: float, n_pop: int = 2) -> None:
        super().__init__()
        base = tower.base_dim
        self.tower = tower
        self.dim = dim
        self.proj = nn.Linear(base, dim, bias=False)
        if dim == base:
            # Start from the base's own geometry: the untrained model ranks like the base does.
            nn.init.eye_(self.proj.weight)
        self.history = history
        self.signal_emb = nn.Embedding(N_SIGNALS, dim)
        nn.init.normal_(self.signal_emb.weight, std=0.01)
        # Attention biases by recency (log hours) and by how many behaviours ago (log count).
        self.age_slope = nn.Parameter(torch.tensor(0.0))
        self.rel_slope = nn.Parameter(torch.tensor(0.0))
        self.q0 = nn.Parameter(torch.zeros(dim))
        self.wq = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.wq.weight)
        self.w_short = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.w_short.weight)
        self.w_long = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.w_long.weight)
        self.w_prof = nn.Linear(base, dim, bias=False)
        nn.init.zeros_(self.w_prof.weight)
        self.log_scale = nn.Parameter(torch.tensor(math.log(5.0)))
        self.w_pop = nn.Parameter(torch.zeros(n_pop))
        self.mu = nn.Parameter(torch.tensor(3.5))
        self.rating_scale = nn.Parameter(torch.tensor(0.1))
        self.item_emb = nn.Parameter(torch.zeros(0, dim))
        self.item_bias = nn.Parameter(torch.zeros(0))
        self.rating_bias = nn.Parameter(torch.zeros(0))
        self.fuse: nn.Linear | None = None
        self.drop = nn.Dropout(dropout)

    def user(
        self,
        vec: torch.Tensor,  # (U, T, d) behaviour vectors (items or queries), oldest first
        signal: torch.Tensor,  # (U, T) long
        ts: torch.Tensor,  # (U, T) float, seconds relative to the episode's start
        valid: torch.Tensor,  # (U, T) bool
        qpos: torch.Tensor,  # (U, Q) long: positions at which user vectors are wanted
        long_term: torch.Tensor,  # (U, d)
        profile: torch.Tensor,  # (U, base)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """User vectors (U, Q, d) at positions `qpos` (each from the behaviours before it),
        and the attention over the behaviours (U, Q, T)."""
        _, T, d = vec.shape
        h = self.drop(vec + self.signal_emb(signal)) * valid[..., None].to(vec.dtype)
        prev_idx = (qpos - 1).clamp(min=0)
        prev = h.gather(1, prev_idx[..., None].expand(-1, -1, d)) * (qpos > 0)[..., None].to(h.dtype)
        q = self.q0 + self.wq(prev)  # (U, Q, d)
        logits = (q @ h.transpose(1, 2)) / math.sqrt(d)  # (U, Q, T)
        k = torch.arange(T, device=vec.device)[None, None, :]
        rel = qpos[..., None] - 1 - k
        allowed = (rel >= 0) & (rel < self.history) & valid[:, None, :]
        ts_prev = ts.gather(1, prev_idx)
        age_h = (ts_prev[..., None] - ts[:, None, :]).clamp(min=0) / 3600.0
        # Recency and order as smooth biases: cheap, and a handful of parameters.
        logits = (
            logits
            + self.age_slope * torch.log1p(age_h)
            + self.rel_slope * torch.log1p(rel.clamp(min=0).to(h.dtype))
        )
        logits = logits.masked_fill(~allowed, float("-inf"))
        weights = torch.nan_to_num(torch.softmax(logits.float(), dim=-1), nan=0.0).to(h.dtype)
        short = weights @ h
        u = self.w_short(short) + (self.w_long(long_term) + self.w_prof(profile))[:, None, :]
        return u, weights


# Per-item parameters: already inside the published item vectors, never swapped for serving.
_PER_ITEM = ("item_emb", "item_bias", "rating_bias")


def _rows_tensor(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(list(rows), dtype=torch.long, device=device)


class FineTunedModel(InterestModel):
    """`adapter`, `top_layers:k`, `lora:r`: one class, the tower is the strategy."""

    def __init__(
        self, encoder: TextEncoder, strategy: str = "adapter", arg: str | None = None, **kwargs: Any
    ):
        self.opts = FineTuneOptions.from_kwargs(**kwargs)
        o = self.opts
        set_deterministic(o.seed, o.deterministic)
        self.encoder = encoder
        self.device = pick_device(o.device)
        self.catalog = Catalog(encoder)
        tower = build_tower(
            strategy,
            arg,
            encoder,
            dropout=o.dropout,
            adapter_hidden=o.adapter_hidden,
            lora_layers=o.lora_layers,
        )
        self.spec = tower.strategy
        self.name = self.spec.split(":")[0]
        dim = o.dim or int(encoder.dim)
        self.net = InterestNet(tower, dim, o.history, o.dropout, n_pop=len(o.popularity_half_lives_s))
        with torch.no_grad():
            self.net.log_scale.fill_(math.log(o.init_scale))
            self.net.w_pop.fill_(o.init_pop_weight / len(o.popularity_half_lives_s))
        self.net.to(self.device)
        self.rng = np.random.default_rng(o.seed)
        self.users: dict[str, UserState] = {}
        self.profiles: dict[str, str] = {}
        self._modal: np.ndarray | None = None  # (n_items, m) other-modality embeddings, zero rows = none
        self._pop = np.zeros((0, len(o.popularity_half_lives_s)), dtype=np.float64)
        self._pop_t: float | None = None
        self._live_vec = torch.zeros(0, dim)  # item vectors of the live weights (no grad)
        self._live_aug = np.zeros((0, dim + 1), dtype=np.float32)
        self._published_aug = np.zeros((0, dim + 1), dtype=np.float32)
        self._serving: dict[str, torch.Tensor] = {}  # shared weights of the published version
        self._uvec: dict[str, np.ndarray] = {}
        self._user_bias: dict[str, tuple[float, int]] = {}
        self.replay: ReplayBuffer[tuple[Episode, Target]] = ReplayBuffer(o.replay_size, seed=o.seed)
        self._make_optimizer()
        self.dp = _make_dp(o)
        self._batched_grads = True  # DP: per-user gradients in one vmapped backward pass
        self._dp_rows: dict[str, list[int]] = {}  # DP: counted rows since the last publish, per user
        # DP: variance of the noise in each popularity column (decays with the counts).
        self._dp_pop_var = np.zeros(len(o.popularity_half_lives_s))
        self._version = ""
        self._parent: str | None = None
        self._batches_since_publish = 0
        self._last_publish = time.monotonic()
        self._preq: list[float] = []
        self._bad_batches = 0
        self.rollbacks = 0
        self._good_state: dict[str, Any] | None = None
        self._publishes = 0
        self.batches = 0
        # False on a scale-out follower: it keeps its users' state and vectors current against
        # the weights it loaded from the trainer, and neither trains nor publishes.
        self.train_shared = True
        self._publish(initial=True)

    # ---- InterestModel -------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return self._version

    @property
    def dim(self) -> int:
        return self.net.dim + 1

    def config(self) -> dict[str, Any]:
        opts = asdict(self.opts)
        opts.pop("half_life_s", None)
        if self.dp is None:  # DP off: the config (and so the version ids) of before
            opts = {k: v for k, v in opts.items() if not k.startswith("dp_")}
        return {"model": self.spec, "base": self.encoder.version, **self.net.tower.describe(), **opts}

    def item_ids(self) -> Sequence[str]:
        return self.catalog.ids

    def item_matrix(self) -> np.ndarray:
        """Item vectors of the published version that user vectors name (bias in the last column)."""
        return self._published_aug

    def user_vector(self, user_id: str) -> np.ndarray | None:
        return self._uvec.get(user_id)

    def predict_many(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Scores (len(user_ids), n_items) in one product, and which users were scored (all)."""
        vecs = np.stack([self._uvec[u] if u in self._uvec else self._cold_vector(u)[0] for u in user_ids])
        # Every user gets real scores: those without a vector of their own are ranked by their
        # cold-start prior (first search, profile, or popularity), as production serves them.
        return vecs @ self._published_aug.T, np.ones(len(user_ids), dtype=bool)

    def predict(self, user_id: str) -> np.ndarray | None:
        vec = self._uvec.get(user_id)
        if vec is None:
            vec = self._cold_vector(user_id)[0]
        return self._published_aug @ vec

    def set_profiles(self, profiles: Sequence[UserProfile]) -> None:
        for p in profiles:
            if p.attrs:
                self.profiles[p.user_id] = profile_text(p.attrs)

    def known_users(self) -> Sequence[str]:
        return list(self.users)

    def get_user_state(self, user_id: str) -> dict[str, Any] | None:
        s = self.users.get(user_id)
        if s is None:
            return None
        out = s.to_json()
        ub = self._user_bias.get(user_id)
        if ub is not None:
            out["rating_sum"], out["rating_n"] = ub
        return out

    def set_user_state(self, user_id: str, state: Mapping[str, Any]) -> None:
        self.users[user_id] = UserState.from_json(state, self.opts.history)
        if "rating_n" in state:
            self._user_bias[user_id] = (float(state["rating_sum"]), int(state["rating_n"]))
        self._refresh_users([user_id])

    def forget_user(self, user_id: str) -> None:
        self.users.pop(user_id, None)
        self._uvec.pop(user_id, None)
        self._user_bias.pop(user_id, None)
        self.profiles.pop(user_id, None)

    # ---- catalog ---------------------------------------------------------------------------------
    def upsert_items(self, items: Sequence[Item]) -> None:
        if not items:
            return
        rows = self.catalog.upsert(items)
        n = len(self.catalog)
        self._grow(n)
        for item, row in zip(items, rows, strict=True):
            if item.embedding is not None:
                self._set_modal(row, np.asarray(item.embedding, dtype=np.float32))
        self.net.tower.sync(self.catalog, rows)
        self._refresh_items()
        # New items enter the published space at once (their text vector, no behaviour yet).
        self._published_aug = np.concatenate(
            [self._published_aug, self._live_aug[len(self._published_aug) :]]
        )
        if len(rows):
            self._published_aug[rows] = self._live_aug[rows]

    def _set_modal(self, row: int, emb: np.ndarray) -> None:
        n = len(self.catalog)
        if self._modal is None:
            self._modal = np.zeros((n, emb.shape[0]), dtype=np.float32)
            fuse = nn.Linear(emb.shape[0], self.net.tower.base_dim, bias=False).to(self.device)
            nn.init.normal_(fuse.weight, std=1.0 / math.sqrt(emb.shape[0]))
            self.net.fuse = fuse
            self.optimizer.add_param_group(
                {"params": list(fuse.parameters()), "weight_decay": self.opts.weight_decay}
            )
        if emb.shape[0] != self._modal.shape[1]:
            log.warning(
                "item %s: embedding has %d dimensions, the catalog's have %d; the embedding is ignored",
                self.catalog.ids[row],
                emb.shape[0],
                self._modal.shape[1],
            )
            return
        if self._modal.shape[0] < n:
            self._modal = np.concatenate(
                [self._modal, np.zeros((n - self._modal.shape[0], self._modal.shape[1]), np.float32)]
            )
        norm = float(np.linalg.norm(emb))
        self._modal[row] = emb / norm if norm > 0 else emb

    def _grow(self, n: int) -> None:
        """Extend per-item parameters (zero rows) and their optimizer state to n items."""
        net = self.net
        old = net.item_emb.shape[0]
        if len(self._pop) < n:
            self._pop = np.concatenate([self._pop, np.zeros((n - len(self._pop), self._pop.shape[1]))])
        if n <= old:
            return
        extra = n - old
        params = {"item_emb": (extra, net.dim), "item_bias": (extra,), "rating_bias": (extra,)}
        for name, shape in params.items():
            p_old: nn.Parameter = getattr(net, name)
            p_new = nn.Parameter(torch.cat([p_old.data, torch.zeros(*shape, device=self.device)]))
            state = self.optimizer.state.pop(p_old, None)
            for group in self.optimizer.param_groups:
                group["params"] = [p_new if p is p_old else p for p in group["params"]]
            if state:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key] = torch.cat([state[key], torch.zeros(*shape, device=self.device)])
                self.optimizer.state[p_new] = state
            setattr(net, name, p_new)

    def _make_optimizer(self) -> None:
        decay, no_decay, items, layers = [], [], [], []
        for name, p in self.net.named_parameters():
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
        lr = self.opts.lr
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.opts.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
                # Each item's row sees few steps in one pass over a stream: it gets a larger rate.
                {"params": items, "weight_decay": 0.0, "lr": lr * self.opts.item_lr_multiplier},
                # Pretrained transformer weights (top_layers/lora) move slowly: their outputs are
                # cached between refreshes, and a large rate undoes the pretraining.
                {"params": layers, "weight_decay": self.opts.weight_decay, "lr": self._layer_lr()},
            ],
            lr=lr,
        )

    def _layer_lr(self) -> float:
        o = self.opts
        mult = o.lora_lr_multiplier if self.net.tower.strategy.startswith("lora") else o.layer_lr_multiplier
        return o.lr * mult

    # ---- item vectors ----------------------------------------------------------------------------
    def _tower_rows(self, rows: torch.Tensor, live: Mapping[int, float] | None = None) -> torch.Tensor:
        tower = self.net.tower
        out = tower(rows, live)
        if self.net.fuse is not None and self._modal is not None:
            modal = torch.from_numpy(self._modal[rows.cpu().numpy()]).to(self.device)
            out = out + self.net.fuse(modal)
        return out

    def _item_vectors(
        self, rows: torch.Tensor, grad_rows: Mapping[int, float] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors and scoring biases of `rows`, with gradients; a tower with an expensive part
        (transformer layers) runs it on `grad_rows` only and caches the rest (`models.towers`)."""
        net = self.net
        base = self._tower_rows(rows, grad_rows)
        vec = net.proj(base) + net.item_emb[rows]
        pop = self._pop_feature(self._pop[rows.cpu().numpy()])
        bias = net.item_bias[rows] + pop @ net.w_pop
        return vec, bias

    @torch.no_grad()
    def _refresh_items(self, full_tower: bool = False) -> None:
        """Recompute the live item vectors (cheap: cached tower outputs through the projection)."""
        net = self.net
        n = len(self.catalog)
        if n == 0:
            return
        was = net.training
        net.eval()
        if full_tower:
            net.tower.refresh()
        # Over every row: cheap for every tower (transformer layers come from their cache).
        rows = _rows_tensor(range(n), self.device)
        base = torch.cat([self._tower_rows(rows[i : i + 512]) for i in range(0, n, 512)])
        vec = net.proj(base) + net.item_emb[rows]
        pop = self._pop_feature(self._pop[:n])
        bias = net.item_bias[rows] + pop @ net.w_pop
        net.train(was)
        self._live_vec = vec.float().cpu()
        self._live_aug = np.concatenate([self._live_vec.numpy(), bias.float().cpu().numpy()[:, None]], axis=1)

    # ---- user vectors ------------------------------------------------------------------------------
    def _episode_tensors(
        self, episodes: Sequence[Episode], item_vec: torch.Tensor, row_col: Mapping[int, int] | None
    ) -> tuple[torch.Tensor, ...]:
        """(U, T) tensors of the episodes' behaviours; item vectors gathered from `item_vec`
        (indexed by catalog row, or through `row_col` when it holds a subset of rows)."""
        U = len(episodes)
        T = max(1, max(len(ep.behaviours) for ep in episodes))
        n_items = item_vec.shape[0]
        pad = -1  # a zero row appended below
        idx = np.full((U, T), pad, dtype=np.int64)
        signal = np.zeros((U, T), dtype=np.int64)
        ts = np.zeros((U, T), dtype=np.float64)
        queries: dict[str, int] = {}
        index: Mapping[str, int] = self.catalog.index
        if row_col is not None:
            ids = self.catalog.ids
            index = {ids[r]: c for r, c in row_col.items()}
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
            qv = self.net.proj(self.net.tower.encode_texts(list(queries)))
            parts.append(qv.to(item_vec.dtype))
        parts.append(torch.zeros(1, item_vec.shape[1], dtype=item_vec.dtype, device=item_vec.device))
        table = torch.cat(parts)
        idx[~valid] = table.shape[0] - 1
        dev = self.device
        vec = table[torch.from_numpy(idx).to(dev).reshape(-1)].reshape(U, T, -1)
        return (
            vec,
            torch.from_numpy(signal).to(dev),
            torch.from_numpy(ts.astype(np.float32)).to(dev),
            torch.from_numpy(valid).to(dev),
        )

    def _profile_tensor(self, user_ids: Sequence[str]) -> torch.Tensor:
        texts = [self.profiles.get(u) for u in user_ids]
        out = torch.zeros(len(user_ids), self.net.tower.base_dim, device=self.device)
        known = [i for i, t in enumerate(texts) if t]
        if known:
            enc = self.encoder.encode([texts[i] for i in known])  # type: ignore[misc]
            out[known] = torch.from_numpy(enc).to(self.device)
        return out

    def _long_tensor(self, longs: Sequence[np.ndarray | None]) -> torch.Tensor:
        d = self.net.dim
        arr = np.zeros((len(longs), d), dtype=np.float32)
        for i, lt in enumerate(longs):
            if lt is not None:
                arr[i] = lt
        return torch.from_numpy(arr).to(self.device)

    def _current_episodes(self, user_ids: Sequence[str]) -> list[Episode]:
        return [Episode(u, list(self.users[u].recent), self.users[u].long_term) for u in user_ids]

    @contextmanager
    def _serving_weights(self) -> Iterator[None]:
        """Run the net with the published version's shared weights (swapped in, not copied).

        Per-item rows are not swapped: the published item vectors already hold them.
        """
        params = dict(self.net.named_parameters())
        live: dict[str, torch.Tensor] = {}
        try:
            for name, saved in self._serving.items():
                p = params.get(name)
                if p is not None and p.shape == saved.shape:
                    live[name] = p.data
                    p.data = saved
            yield
        finally:
            for name, data in live.items():
                params[name].data = data

    def _published_vec(self) -> torch.Tensor:
        return torch.from_numpy(self._published_aug[:, :-1]).to(self.device)

    @torch.no_grad()
    def _user_vectors(self, user_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Published user vectors (U, d) and their attention over the recent behaviours (U, T):
        the serving weights over the published item vectors."""
        net = self.net
        was = net.training
        net.eval()
        episodes = self._current_episodes(user_ids)
        t = self._episode_tensors(episodes, self._published_vec(), None)
        qpos = torch.as_tensor([[len(ep.behaviours)] for ep in episodes], device=self.device)
        u, weights = net.user(
            *t, qpos, self._long_tensor([ep.long_term for ep in episodes]), self._profile_tensor(user_ids)
        )
        net.train(was)
        return u[:, 0], weights[:, 0]

    def _refresh_users(self, user_ids: Sequence[str]) -> None:
        user_ids = [u for u in user_ids if u in self.users]
        if not user_ids:
            return
        with self._serving_weights():
            scale = float(self.net.log_scale.detach().exp())
            for i in range(0, len(user_ids), 512):
                part = user_ids[i : i + 512]
                u = self._user_vectors(part)[0].float().cpu().numpy() * scale
                for uid, vec in zip(part, u, strict=True):
                    self._uvec[uid] = np.append(vec, np.float32(1.0)).astype(np.float32)

    def _cold_vector(self, user_id: str, first_query: str | None = None) -> tuple[np.ndarray, str]:
        """A vector for a user without history: first search text, profile, or the popularity prior."""
        d = self.net.dim
        with torch.no_grad(), self._serving_weights():
            scale = float(self.net.log_scale.detach().exp())
            if first_query:
                v = self.net.proj(self.net.tower.encode_texts([first_query]))[0]
                return np.append(v.float().cpu().numpy() * scale, 1.0).astype(np.float32), "search"
            if user_id in self.profiles:
                v = self.net.w_prof(self._profile_tensor([user_id]))[0]
                return np.append(v.float().cpu().numpy() * scale, 1.0).astype(np.float32), "profile"
        # A zero interest part leaves only the item bias: time-decayed popularity.
        return np.append(np.zeros(d, dtype=np.float32), 1.0).astype(np.float32), "popularity"

    # ---- learning --------------------------------------------------------------------------------
    def _signal(self, e: Event) -> int:
        if e.kind == "rating" and e.rating is not None:
            return rating_signal(e.rating, self.opts.rating_min, self.opts.rating_max)
        return SIGNAL_SEARCH if e.kind == "search" else SIGNAL_CLICK

    def _observe(self, events: Sequence[Event]) -> tuple[list[Episode], dict[str, int], dict[str, str]]:
        """Walk the batch in time order: one episode per user (their context before the batch
        plus the batch's behaviours, with a target at each event), updating the user states."""
        o = self.opts
        episodes: dict[str, Episode] = {}
        touched: dict[str, int] = {}
        cold: dict[str, str] = {}
        live = self._live_vec.numpy()
        index = self.catalog.index
        for e in events:
            state = self.users.get(e.user_id)
            if state is None:
                state = self.users[e.user_id] = UserState(history_len=o.history, last_ts=e.ts)
                cold[e.user_id] = (
                    "search"
                    if e.kind == "search" and e.query
                    else "profile"
                    if e.user_id in self.profiles
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
            if e.target_item is not None:
                # Kept even when the item is not in the catalog yet: it counts once it arrives.
                new.append(Behaviour(self._signal(e), e.ts, e.target_item, None, e.event_id))
            if row is not None:
                weight = 1.0
                if e.kind == "rating" and e.rating is not None:
                    weight = (e.rating - o.rating_min) / max(o.rating_max - o.rating_min, 1e-9)
                    s, n = self._user_bias.get(e.user_id, (0.0, 0))
                    self._user_bias[e.user_id] = (s + e.rating, n + 1)
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

    def _replay_items(self, episodes: Sequence[Episode]) -> list[tuple[Episode, Target]]:
        """This batch's positives, for the replay buffer (as references: few are ever replayed,
        so each becomes a single-target episode only when drawn, in `_replayed`)."""
        return [(ep, t) for ep in episodes for t in ep.targets if t.positive]

    def _replayed(self, n: int) -> list[Episode]:
        L = self.opts.history
        out = []
        for ep, t in self.replay.sample(n):
            ctx = ep.behaviours[max(0, t.pos - L) : t.pos]
            out.append(Episode(ep.user_id, ctx, ep.long_term, [replace(t, pos=len(ctx))]))
        return out

    def _chunks(self, ep: Episode) -> list[Episode]:
        """Split a long episode so that no chunk is longer than 2 × history: each target only
        attends over the `history` behaviours before it, so the rest is padding and waste."""
        L = self.opts.history
        if len(ep.behaviours) <= 2 * L or len(ep.targets) <= 1:
            return [ep]
        index = self.catalog.index
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

    def _step(self, episodes: Sequence[Episode]) -> float:
        """One optimisation step over the targets of `episodes`; returns the loss before the update."""
        o = self.opts
        net = self.net
        n = len(self.catalog)
        episodes = [c for ep in episodes for c in self._chunks(ep)]
        flat = [(u, t) for u, ep in enumerate(episodes) for t in ep.targets]
        pos = [(u, t) for u, t in flat if t.positive]
        if not flat:
            return float("nan")
        full = n <= o.full_softmax_max
        drawn: set[int] = set()
        if full:
            cand_rows = list(range(n))
        else:
            cand = {t.row for _, t in pos}
            drawn = {int(r) for r in self.rng.integers(0, n, size=o.random_negatives)}
            cand.update(drawn)
            for _, t in pos:
                cand.update(t.hard)
            cand_rows = sorted(cand)
        index = self.catalog.index
        own = {t.row for _, t in flat}  # the batch's own items: targets and contexts
        for ep in episodes:
            for b in ep.behaviours:
                r = index.get(b.item_id) if b.item_id is not None else None
                if r is not None:
                    own.add(r)
        need = set(cand_rows) | own
        need_rows = sorted(need)
        col = {r: i for i, r in enumerate(need_rows)}
        # A cheap tower (the adapter) runs with gradients over every candidate: the negatives'
        # gradients through it are worth it (ML-100K NDCG@10 0.0569 vs 0.0515 with gradients
        # on the batch's own items only). Transformer layers run on a weighted sample of the
        # targets and the other candidates (`sample_live_rows`); the rest come from the cache.
        grad_rows: dict[int, float] | None = None
        if not net.tower.cheap:
            targets = list(dict.fromkeys(t.row for _, t in pos))
            grad_rows = sample_live_rows(targets, cand_rows, o.tower_items_per_step, self.rng)

        dev = self.device
        # ---- DP: each loss term per row, with the user (index) it belongs to ----
        dp = self.dp
        terms: list[tuple[float, torch.Tensor, torch.Tensor]] = []
        user_index: dict[str, int] = {}
        for ep in episodes:
            user_index.setdefault(ep.user_id, len(user_index))

        def who(idx: Sequence[int]) -> torch.Tensor:
            return _rows_tensor([user_index[episodes[flat[i][0]].user_id] for i in idx], dev)

        # ---- end DP ----
        net.train()
        with autocast(dev, o.bf16):
            vec, bias = self._item_vectors(_rows_tensor(need_rows, dev), grad_rows)
            t = self._episode_tensors(episodes, vec, col)
            n_q = max(len(ep.targets) for ep in episodes)
            qpos_np = np.zeros((len(episodes), n_q), dtype=np.int64)
            slot = []
            for u, ep in enumerate(episodes):
                for qi, tg in enumerate(ep.targets):
                    qpos_np[u, qi] = tg.pos
                    slot.append(u * n_q + qi)
            u_q, _w = net.user(
                *t,
                torch.from_numpy(qpos_np).to(dev),
                self._long_tensor([ep.long_term for ep in episodes]),
                self._profile_tensor([ep.user_id for ep in episodes]),
            )
            u_all = u_q.reshape(-1, u_q.shape[-1])[_rows_tensor(slot, dev)]
            scale = net.log_scale.exp()
            losses: list[torch.Tensor] = []
            pos_idx = [i for i, (_, t) in enumerate(flat) if t.positive]
            if pos_idx:
                up = u_all[pos_idx]
                cand_cols = _rows_tensor([col[r] for r in cand_rows], dev)
                logits = scale * (up @ vec[cand_cols].T) + bias[cand_cols]
                if full:
                    cand_pos = None
                    target = _rows_tensor([flat[i][1].row for i in pos_idx], dev)
                else:
                    cand_pos = {r: i for i, r in enumerate(cand_rows)}
                    target = _rows_tensor([cand_pos[flat[i][1].row] for i in pos_idx], dev)
                mask = self._seen_mask(episodes, [flat[i] for i in pos_idx], len(cand_rows), cand_pos)
                if dp is not None and cand_pos is not None:
                    # DP: another user's positives or impressions are not this user's negatives
                    # (their presence would change this user's term: sensitivity beyond `clip`).
                    mask |= self._dp_foreign_mask([flat[i][1] for i in pos_idx], cand_pos, drawn)
                if o.loss == "bpr":
                    pos_logit = logits.gather(1, target[:, None]).squeeze(1)
                    valid = ~mask
                    valid[torch.arange(len(target)), target] = False
                    if dp is not None:
                        terms.append((1.0, bpr(pos_logit, logits, valid, per_row=True), who(pos_idx)))
                    else:
                        losses.append(bpr(pos_logit, logits, valid))
                elif dp is not None:
                    terms.append(
                        (1.0, sampled_softmax(logits.float(), target, mask, per_row=True), who(pos_idx))
                    )
                else:
                    losses.append(sampled_softmax(logits.float(), target, mask))
                # Impressions shown but not clicked: a pairwise push below the clicked item.
                hp, hn = [], []
                for k, i in enumerate(pos_idx):
                    for r in flat[i][1].hard:
                        c = r if cand_pos is None else cand_pos.get(r)
                        if c is not None:
                            hp.append(k)
                            hn.append(c)
                if hp and o.hard_negative_weight > 0:
                    hp_t = _rows_tensor(hp, dev)
                    pos_logit = logits.gather(1, target[:, None]).squeeze(1)[hp_t]
                    neg_logit = logits[hp_t, _rows_tensor(hn, dev)]
                    if dp is not None:
                        pair = bpr(pos_logit, neg_logit[:, None], per_row=True)
                        terms.append((o.hard_negative_weight, pair, who([pos_idx[k] for k in hp])))
                    else:
                        losses.append(o.hard_negative_weight * bpr(pos_logit, neg_logit[:, None]))
            rated = [i for i, (_, t) in enumerate(flat) if t.rating is not None]
            if rated and o.rating_weight > 0:
                tcols = _rows_tensor([col[flat[i][1].row] for i in rated], dev)
                trows = _rows_tensor([flat[i][1].row for i in rated], dev)
                ub = torch.tensor(
                    [self._user_offset(episodes[flat[i][0]].user_id) for i in rated], device=dev
                )
                dots = (u_all[rated] * vec[tcols]).sum(-1)
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
                qv = net.proj(net.tower.encode_texts([flat[i][1].query for i in searched]))  # type: ignore[misc]
                tcols = _rows_tensor([col[flat[i][1].row] for i in searched], dev)
                losses.append(o.search_weight * info_nce(qv, vec[tcols]))
            if dp is not None:
                return self._dp_step(terms, user_index)
            if not losses:
                return float("nan")
            loss = torch.stack([x.float() for x in losses]).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if o.clip_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
        self.optimizer.step()
        return float(loss.detach())

    # ---- DP (models/privacy.py) ------------------------------------------------------------------
    def _dp_params(self) -> list[torch.Tensor]:
        """Shared parameters trained under DP. Per-item rows stay frozen (at zero): noise on
        every row of a sparse table would swamp the few users who touched a row, and each row
        would drift by Adam's step size every step (docs/privacy.md)."""
        return [
            p for name, p in self.net.named_parameters() if p.requires_grad and not name.startswith(_PER_ITEM)
        ]

    def _dp_step(
        self, terms: Sequence[tuple[float, torch.Tensor, torch.Tensor]], users: Mapping[str, int]
    ) -> float:
        """Per-user losses -> per-user gradients, kept for `_dp_learn` (which releases them)."""
        dp = self.dp
        assert dp is not None
        if not terms:
            return float("nan")
        n_users = len(users)
        per_user = torch.zeros(n_users, device=self.device)
        for weight, rows, owner in terms:
            # Each user's mean of each term: a user's weight does not grow with their events.
            zero = torch.zeros(n_users, device=self.device)
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
        by_user: dict[str, list[Episode]] = {}
        for ep in episodes:
            by_user.setdefault(ep.user_id, []).append(ep)
        self._dp_grads: dict[str, Sequence[torch.Tensor | None]] = {}
        losses = []
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
            loss = self._step(part)
            if math.isfinite(loss):
                losses.append(loss)
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
        allowed = torch.zeros(len(targets), len(cand_pos), dtype=torch.bool, device=self.device)
        if drawn:
            allowed[:, _rows_tensor([cand_pos[r] for r in drawn], self.device)] = True
        for k, t in enumerate(targets):
            own = [cand_pos[r] for r in t.hard if r in cand_pos]
            if own:
                allowed[k, _rows_tensor(own, self.device)] = True
        return ~allowed

    def _dp_collect_counts(self, events: Sequence[Event], admitted: set[str]) -> None:
        """Remember the catalog rows of the admitted events of a released step, per user."""
        for e in events:
            row = self.catalog.row(e.target_item) if e.event_id in admitted else None
            if row is not None:
                self._dp_rows.setdefault(e.user_id, []).append(row)

    def _dp_release_counts(self) -> None:
        """At a publish: the popularity increments since the last one, clipped per user and
        noised, in one release. Once per publish rather than per step: the noise on every row
        adds up over releases, and per step it drowned the counts (ML-100K, first 3,000 events:
        recall@10 0.0057 with per-step releases vs 0.038 with noiseless counts). A user is in
        a count release only if they were in a gradient release since the last one, so the
        accountant's two releases per participation still bound it."""
        if self.dp is None or not self._dp_rows:
            return
        n = len(self.catalog)
        self._pop[:n] += self.dp.noisy_counts(self._dp_rows, n)[:, None]
        self._dp_pop_var += self.dp.noise_multiplier**2
        self._dp_rows = {}

    def privacy_state(self) -> dict[str, float]:
        return self.dp.state() if self.dp is not None else {}

    # ---- end DP ----------------------------------------------------------------------------------
    def _seen_mask(
        self,
        episodes: Sequence[Episode],
        targets: Sequence[tuple[int, Target]],
        n_cand: int,
        cand_pos: Mapping[int, int] | None,
    ) -> torch.Tensor:
        """(P, C) True where a candidate is an item the user already had: never a negative,
        as the evaluation never ranks items a user already has."""
        index = self.catalog.index
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
        mask = torch.zeros(len(targets), n_cand, dtype=torch.bool, device=self.device)
        if pi:
            p = torch.from_numpy(np.concatenate(pi)).to(self.device)
            c = torch.from_numpy(np.concatenate(ci)).to(self.device)
            mask[p, c] = True
        return mask

    def _user_offset(self, user_id: str) -> float:
        s, n = self._user_bias.get(user_id, (0.0, 0))
        mu = float(self.net.mu.detach())
        return (s - n * mu) / (n + 5.0)  # shrunk towards 0 for users with few ratings

    def predict_rating(self, user_id: str, item_id: str) -> float | None:
        """Predicted rating (MSE-trained head with global, user and item biases)."""
        row = self.catalog.row(item_id)
        vec = self._uvec.get(user_id)
        if row is None or vec is None:
            return None
        scale = float(self.net.log_scale.detach().exp())
        dot = float(vec[:-1] @ self._live_vec[row].numpy()) / scale
        with torch.no_grad():
            pred = (
                float(self.net.mu)
                + self._user_offset(user_id)
                + float(self.net.rating_bias[row])
                + float(self.net.rating_scale) * dot
            )
        return float(min(max(pred, self.opts.rating_min), self.opts.rating_max))

    def _pop_feature(self, counts: np.ndarray) -> torch.Tensor:
        """log(1 + decayed count). Under DP the counts carry noise of known spread: only what
        stands 2 standard deviations above it counts (post-processing; no extra privacy cost)."""
        if self.dp is not None:
            counts = counts - 2.0 * np.sqrt(self._dp_pop_var)
        return torch.from_numpy(np.log1p(np.maximum(counts, 0.0)).astype(np.float32)).to(self.device)

    def _update_popularity(self, events: Sequence[Event], counts: np.ndarray | None = None) -> None:
        """Decay the counts to the batch's newest event time, then count the batch's events
        (or, under DP, add `counts`: the noised release of them; None there = nothing to add)."""
        if not events:
            return
        t = max(e.ts for e in events)
        if self._pop_t is not None and t > self._pop_t:
            hl = np.asarray(self.opts.popularity_half_lives_s, dtype=np.float64)
            self._pop *= 0.5 ** ((t - self._pop_t) / hl)
            self._dp_pop_var *= 0.25 ** ((t - self._pop_t) / hl)
        self._pop_t = t if self._pop_t is None else max(self._pop_t, t)
        if self.dp is not None:
            if counts is not None:
                self._pop[: len(counts)] += counts[:, None]
            return
        for e in events:
            row = self.catalog.row(e.target_item)
            if row is not None:
                self._pop[row] += 1.0

    def learn(self, events: Sequence[Event]) -> BatchResult:
        with cpu_threads(self.device, self.opts.cpu_threads):
            return self._learn(events)

    def _learn(self, events: Sequence[Event]) -> BatchResult:
        o = self.opts
        episodes, touched, cold = self._observe(events)
        loss = None
        # ---- DP (models/privacy.py): only admitted events train; no replay (a replayed event
        # would take its user into more releases than the cap allows). ----
        dp = self.dp
        training = self.train_shared and not (dp is not None and dp.exhausted)
        released_before = dp.releases if dp is not None else 0
        admitted: set[str] = set()
        if dp is not None and training:
            admitted = dp.admit(events)
            for ep in episodes:
                ep.targets = [t for t in ep.targets if t.event_id in admitted]
        # ---- end DP ----
        if training and any(ep.targets for ep in episodes):
            replayed = self._replayed(o.replay_per_batch) if dp is None else []
            batch = [ep for ep in episodes if ep.targets] + replayed
            # Dropout draws from a generator seeded by (seed, batch number): the numbers depend
            # on the data alone, not on what else ran in the process before.
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(o.seed * 1_000_003 + self.batches)
                step = self._step if dp is None else self._dp_learn
                losses = [step(batch) for _ in range(max(1, o.steps_per_batch))]
            loss = losses[0]
            if dp is None:
                self.replay.extend(self._replay_items(episodes))
        # Popularity counts move after the step: training saw the counts as they were before.
        if dp is None:
            self._update_popularity(events)
        else:
            # DP: the counts move only at a publish, by a noisy release of the admitted events
            # of the steps since (`_dp_release_counts`); between publishes they only decay.
            if dp.releases > released_before:
                self._dp_collect_counts(events, admitted)
            self._update_popularity(events, None)
        self.batches += 1
        self._batches_since_publish += 1
        # DP: no rollback; which weights get published must not hang on the batch's raw loss.
        if loss is not None and math.isfinite(loss) and dp is None:
            self._check_rollback(loss)
        snapshot = None
        if self._publish_is_due():
            snapshot = self._publish()
        elif self.train_shared:
            self._refresh_items()
        self._refresh_users(list(touched))
        updates = {}
        for uid, n in touched.items():
            state = self.users[uid]
            updates[uid] = UserUpdate(
                user_id=uid,
                vector=self._uvec[uid],
                n_applied=n,
                last_event_ts=state.last_ts,
                cold_start=cold.get(uid),
            )
        return BatchResult(updates=updates, model_version=self.model_version, snapshot=snapshot, loss=loss)

    # ---- rollback and publishing ---------------------------------------------------------------
    def publish_due(self) -> bool:
        """Whether the next `learn` publishes a version (the worker refreshes its catalog first,
        so that the version it leaves behind has every item stored so far)."""
        return self._publish_is_due(batches_ahead=1)

    def _publish_is_due(self, batches_ahead: int = 0) -> bool:
        o = self.opts
        return (
            self.train_shared
            and not (self.dp is not None and self.dp.exhausted)
            and (
                self._batches_since_publish + batches_ahead >= o.publish_every_batches
                or time.monotonic() - self._last_publish >= o.publish_every_s
            )
        )

    def _check_rollback(self, loss: float) -> None:
        o = self.opts
        window = self._preq[-o.rollback_window :]
        if len(window) >= max(3, o.rollback_window // 2):
            baseline = float(np.mean(window))
            if loss > baseline * (1 + o.rollback_threshold):
                self._bad_batches += 1
            else:
                self._bad_batches = 0
            if self._bad_batches >= o.rollback_patience and self._good_state is not None:
                log.warning(
                    "prequential loss %.4f is %.0f%% above its rolling mean %.4f for %d batches: "
                    "rolling back to %s",
                    loss,
                    100 * (loss / baseline - 1),
                    baseline,
                    self._bad_batches,
                    self._version,
                )
                self._restore(self._good_state)
                self.rollbacks += 1
                self._bad_batches = 0
                self._preq.clear()
                return
        self._preq.append(loss)

    def _capture(self) -> dict[str, Any]:
        return {
            "net": copy.deepcopy(self.net.state_dict()),
            "opt": copy.deepcopy(self.optimizer.state_dict()),
            "n": len(self.catalog),
        }

    def _restore(self, saved: dict[str, Any]) -> None:
        n_now = len(self.catalog)
        state = saved["net"]
        n_then = saved["n"]
        if n_now > n_then:  # items that arrived since keep zero rows
            for key in ("item_emb", "item_bias", "rating_bias"):
                cur = getattr(self.net, key)
                state = {**state, key: torch.cat([state[key], torch.zeros_like(cur.data[n_then:])])}
        self.net.load_state_dict(state, strict=False)
        self._make_optimizer()
        self._refresh_items(full_tower=True)

    def weights(self) -> bytes:
        """The trainable state (including the item residuals), as torch.save bytes."""
        trainable = {k: v for k, v in self.net.state_dict().items() if not k.startswith("tower.base")}
        buf = io.BytesIO()
        torch.save(
            {
                "net": trainable,
                "item_ids": list(self.catalog.ids),
                "config": self.config(),
                # Not trained, but part of the scores: the items' time-decayed counts.
                "popularity": torch.from_numpy(self._pop.copy()),
                "popularity_t": self._pop_t,
                # The accountant's counts (no user ids): a restart goes on from the published state.
                **(
                    {"dp": self.dp.checkpoint(), "dp_pop_var": self._dp_pop_var.tolist()}
                    if self.dp is not None
                    else {}
                ),
            },
            buf,
        )
        return buf.getvalue()

    def load_weights(self, blob: bytes) -> None:
        """Restore weights published earlier (rows matched by item id; unknown items keep zeros)."""
        saved = torch.load(io.BytesIO(blob), map_location=self.device, weights_only=False)
        state = dict(saved["net"])
        ids = saved["item_ids"]
        n = len(self.catalog)
        for key in ("item_emb", "item_bias", "rating_bias"):
            src = state.pop(key)
            dst = getattr(self.net, key).data.clone()
            for j, item_id in enumerate(ids):
                row = self.catalog.row(item_id)
                if row is not None and row < n:
                    dst[row] = src[j]
            state[key] = dst
        if "popularity" in saved:
            pop = saved["popularity"].numpy()
            for j, item_id in enumerate(ids):
                row = self.catalog.row(item_id)
                if row is not None and row < n:
                    self._pop[row] = pop[j]
            self._pop_t = saved.get("popularity_t")
        if self.dp is not None and "dp" in saved:
            self.dp.restore(saved["dp"])
            self._dp_pop_var = np.asarray(saved.get("dp_pop_var", self._dp_pop_var), dtype=np.float64)
        if "fuse.weight" in state and self.net.fuse is None:
            state.pop("fuse.weight")
        self.net.load_state_dict(state, strict=False)
        self._make_optimizer()
        self._publish(initial=True)  # the restored weights are the version user vectors name now
        self._refresh_users(list(self.users))

    def _publish(self, initial: bool = False) -> ModelSnapshot | None:
        """A new model version: re-encode every item from the cached base with the current weights.

        Users touched by the batch get vectors against the new version in the same result;
        the others keep the (older) version their stored vectors name.
        """
        # Trained transformer layers: every item through them only every few publishes (the
        # items of each step are refreshed as they are trained); the adapter is cheap, always.
        full = initial or self._publishes % self.opts.tower_refresh_every == 0
        if not initial:
            self._dp_release_counts()
        self._refresh_items(full_tower=full)
        blob = self.weights()
        digest = hashlib.sha1(blob).hexdigest()[:12]
        version = f"{self.spec}-{digest}@{self.encoder.version}"
        self._batches_since_publish = 0
        self._last_publish = time.monotonic()
        self._published_aug = self._live_aug.copy()
        self._serving = {
            name: p.detach().clone()
            for name, p in self.net.named_parameters()
            if p.requires_grad and not name.startswith(_PER_ITEM)
        }
        self._publishes += 1
        if self._good_state is None or self._publishes % self.opts.good_state_every == 0:
            self._good_state = self._capture()
        if initial:
            self._version = version
            return None
        if version == self._version:
            return None
        self._parent, self._version = self._version, version
        return ModelSnapshot(
            version=version,
            parent=self._parent,
            config=self.config(),
            item_ids=list(self.catalog.ids),
            item_vectors=self._published_aug.copy(),
            metrics={
                "batches": float(self.batches),
                "rollbacks": float(self.rollbacks),
                **self.privacy_state(),
            },
            weights=blob,
        )

    def snapshot(self) -> ModelSnapshot:
        return ModelSnapshot(
            version=self._version,
            parent=self._parent,
            config=self.config(),
            item_ids=list(self.catalog.ids),
            item_vectors=self._published_aug.copy(),
            weights=self.weights(),
        )

    def rebuild_user(self, user_id: str, events: Sequence[Event]) -> None:
        """Rebuild a user's state from their events (time order) without training on them."""
        profile = self.profiles.get(user_id)
        self.forget_user(user_id)
        if profile is not None:
            self.profiles[user_id] = profile
        self._observe([e for e in events if e.user_id == user_id])
        self._refresh_users([user_id])

    # ---- explain ------------------------------------------------------------------------------
    def explain(self, user_id: str, top: int = 10) -> list[dict[str, Any]]:
        """The behaviours that contributed most to the user's vector, with their share of it.

        A behaviour's weight is the projection of its part of the vector on the whole:
        attention weight times (W_s · its vector) · u / |u|², so the behaviours, the
        long-term average and the profile add up to 1.
        """
        state = self.users.get(user_id)
        if state is None:
            return []
        net = self.net
        was = net.training
        net.eval()
        with torch.no_grad(), self._serving_weights():
            u, att = self._user_vectors([user_id])
            ep = self._current_episodes([user_id])[0]
            vec, signal, _ts, valid = self._episode_tensors([ep], self._published_vec(), None)
            h = (vec + net.signal_emb(signal)) * valid[..., None].to(vec.dtype)
            parts = net.w_short(att[0][:, None] * h[0])  # (T, d)
            uu = u[0]
            denom = float(uu @ uu) or 1.0
            shares = (parts @ uu / denom).float().cpu().numpy()
            long_share = float(net.w_long(self._long_tensor([state.long_term]))[0] @ uu / denom)
            prof_share = float(net.w_prof(self._profile_tensor([user_id]))[0] @ uu / denom)
        net.train(was)
        out: list[dict[str, Any]] = []
        for k, b in enumerate(ep.behaviours):
            kind = (
                "search" if b.signal == SIGNAL_SEARCH else "click" if b.signal == SIGNAL_CLICK else "rating"
            )
            out.append(
                {
                    "event_id": b.event_id,
                    "kind": kind,
                    "item_id": b.item_id,
                    "query": b.query,
                    "ts": b.ts,
                    "attention": float(att[0, k]),
                    "weight": float(shares[k]),
                }
            )
        out.sort(key=lambda r: abs(r["weight"]), reverse=True)
        out = out[:top]
        out.append({"kind": "long_term", "weight": long_share})
        if user_id in self.profiles:
            out.append({"kind": "profile", "weight": prof_share, "query": self.profiles[user_id]})
        return out


def _make_dp(o: FineTuneOptions) -> UserLevelDP | None:
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
    releases = 2 if o.popularity_half_lives_s else 1
    return UserLevelDP(cfg, releases_per_step=releases, expected_users=o.dp_expected_users, seed=o.seed)


def profile_text(attrs: Mapping[str, Any]) -> str:
    """Profile attributes as text for the base; ages become decades so nearby ages share a vector."""
    flat = dict(attrs)
    age = flat.get("age")
    if isinstance(age, int | float):
        flat["age"] = f"{int(age) // 10 * 10}s"
    return item_text("user", flat)


def adapter_model(encoder: TextEncoder, **options: Any) -> FineTunedModel:
    return FineTunedModel(encoder, "adapter", **options)


def top_layers_model(encoder: TextEncoder, **options: Any) -> FineTunedModel:
    return FineTunedModel(encoder, "top_layers", **options)


def lora_model(encoder: TextEncoder, **options: Any) -> FineTunedModel:
    return FineTunedModel(encoder, "lora", **options)
