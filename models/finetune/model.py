"""The fine-tuned interest model: the facade that the worker and the backtest drive.

`FineTunedModel` keeps the catalog, the users' states and vectors, and ties the
parts together: the network (`network`), events -> episodes -> tensors
(`episodes`), the trainer with its budget counted in events (`trainer`), the items'
decayed counts (`popularity`), their co-occurrence (`cooccurrence`, `cooc_chain`), the
published versions with their serving weights (`versions`) and explanations
(`explain`). Scoring, and what the published vectors reproduce with a plain inner product:

    score(user, item) = s · u·e_item + β_item

Published item vectors are [e_item, β_item] and user vectors [s·u, 1], so
`SELECT ... ORDER BY vector <#> user_vector` ranks exactly like `predict`.

Each batch is learned after it was predicted (predict-then-learn): for every
positive event the user vector is built from the behaviours *before* it, and the
clicked/rated item must win a softmax against the catalog (or, for large
catalogs, against its impressions and uniform draws with a log-Q correction).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from models.catalog import Catalog, TextEncoder, item_text
from models.core import BatchResult, InterestModel, ModelSnapshot, UserUpdate
from models.device import cpu_threads, pick_device, set_deterministic
from models.events import Event, Item, UserProfile
from models.finetune.cooc_chain import CoOccurrenceChain
from models.finetune.cooccurrence import CoOccurrence
from models.finetune.episodes import Episode, EpisodeTensors, episode_tensors, newest_queries, observe_batch
from models.finetune.explain import explain_user
from models.finetune.network import InterestNet
from models.finetune.options import FineTuneOptions
from models.finetune.popularity import ItemPopularity
from models.finetune.trainer import Trainer, rows_tensor
from models.finetune.versions import Versions, pack_weights, unpack_weights, version_id
from models.towers import build_tower
from models.user_state import UserState

log = logging.getLogger(__name__)


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
        self.net = InterestNet(
            tower,
            dim,
            o.history,
            o.dropout,
            n_pop=len(o.popularity_half_lives_events),
            blocks=o.blocks,
            heads=o.heads,
            id_evidence=o.id_evidence_events,
            cooc_rank=o.cooc_rank or 0,
        )
        with torch.no_grad():
            self.net.log_scale.fill_(math.log(o.init_scale))
            self.net.w_pop.fill_(o.init_pop_weight / len(o.popularity_half_lives_events))
        self.net.to(self.device)
        self.users: dict[str, UserState] = {}
        self.profiles: dict[str, str] = {}
        self._modal: np.ndarray | None = None  # (n_items, m) other-modality embeddings, zero rows = none
        self.cooc: CoOccurrence | None = None
        self._cooc_chain: CoOccurrenceChain | None = None
        if o.cooc_rank:
            self.cooc = CoOccurrence(o.cooc_rank, seed=o.seed)
            self._cooc_chain = CoOccurrenceChain(self.cooc, o.cooc_checkpoint_every, o.cooc_max_pairs)
        self._published_weights: tuple[bytes, str | None] = (b"", None)  # set by every publish
        self._live_vec = torch.zeros(0, dim)  # item vectors of the live weights (no grad)
        # The training step each live row was computed at: rows are recomputed when used, not
        # every batch (a batch needs ~100 of a catalog that may hold 100,000).
        self._live_stamp = np.zeros(0, dtype=np.int64)
        self._live_aug = np.zeros((0, dim + 1), dtype=np.float32)
        self._uvec: dict[str, np.ndarray] = {}
        self._user_bias: dict[str, tuple[float, int]] = {}
        self.versions = Versions(dim)
        self.trainer = Trainer(self, o)
        self.popularity = ItemPopularity(o.popularity_half_lives_events, private=self.trainer.dp is not None)
        self.batches = 0
        # The newest event time learned: a version published now has seen every event up to it,
        # so a replay or `istream evaluate` may serve it only to later events.
        self.learned_through = -math.inf
        # False on a scale-out follower: it keeps its users' state and vectors current against
        # the weights it loaded from the trainer, and neither trains nor publishes.
        self.train_shared = True
        self._publish(initial=True)

    # ---- InterestModel -------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return self.versions.version

    @property
    def dim(self) -> int:
        return self.net.dim + 1

    def config(self) -> dict[str, Any]:
        opts = asdict(self.opts)
        opts.pop("half_life_s", None)
        if self.trainer.dp is None:  # DP off: the config (and so the version ids) of before
            opts = {k: v for k, v in opts.items() if not k.startswith("dp_")}
        return {"model": self.spec, "base": self.encoder.version, **self.net.tower.describe(), **opts}

    def item_ids(self) -> Sequence[str]:
        return self.catalog.ids

    def item_matrix(self) -> np.ndarray:
        """Item vectors of the published version that user vectors name (bias in the last column)."""
        return self.versions.item_aug

    def user_vector(self, user_id: str) -> np.ndarray | None:
        return self._uvec.get(user_id)

    def predict_many(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Scores (len(user_ids), n_items) in one product, and which users were scored (all)."""
        vecs = np.stack([self._uvec[u] if u in self._uvec else self._cold_vector(u)[0] for u in user_ids])
        # Every user gets real scores: those without a vector of their own are ranked by their
        # cold-start prior (first search, profile, or popularity), as production serves them.
        return vecs @ self.versions.item_aug.T, np.ones(len(user_ids), dtype=bool)

    def predict(self, user_id: str) -> np.ndarray | None:
        vec = self._uvec.get(user_id)
        if vec is None:
            vec = self._cold_vector(user_id)[0]
        return self.versions.item_aug @ vec

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

    def on_user_drift(self, user_id: str) -> None:
        """The user's interests moved (their prequential loss drifted up): keep only their newest
        behaviours in the attention window and restart their long-term average from them."""
        state = self.users.get(user_id)
        if state is None:
            return
        keep = list(state.recent)[-self.opts.drift_keep :]
        state.recent.clear()
        state.recent.extend(keep)
        state.long_term = None

    def forget_user(self, user_id: str) -> None:
        self.users.pop(user_id, None)
        self._uvec.pop(user_id, None)
        self._user_bias.pop(user_id, None)
        self.profiles.pop(user_id, None)
        self.trainer.drift.forget(user_id)
        self.popularity.forget(user_id)

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
        self.refresh_items()
        self.versions.add_items(self._live_aug, rows)

    def _set_modal(self, row: int, emb: np.ndarray) -> None:
        n = len(self.catalog)
        if self._modal is None:
            self._modal = np.zeros((n, emb.shape[0]), dtype=np.float32)
            fuse = nn.Linear(emb.shape[0], self.net.tower.base_dim, bias=False).to(self.device)
            nn.init.normal_(fuse.weight, std=1.0 / math.sqrt(emb.shape[0]))
            self.net.fuse = fuse
            self.trainer.add_params(list(fuse.parameters()))
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
        self.popularity.grow(n)
        if self.cooc is not None:
            self.cooc.grow(n)
        if n <= old:
            return
        extra = n - old
        params = {"item_emb": (extra, net.dim), "item_bias": (extra,), "rating_bias": (extra,)}
        for name, shape in params.items():
            p_old: nn.Parameter = getattr(net, name)
            p_new = nn.Parameter(torch.cat([p_old.data, torch.zeros(*shape, device=self.device)]))
            self.trainer.swap_param(p_old, p_new, shape)
            setattr(net, name, p_new)

    # ---- item vectors ----------------------------------------------------------------------------
    def cooc_part(self, rows: torch.Tensor) -> torch.Tensor | None:
        """A(co-occurrence factors) of `rows`, the part of their vectors that counting gives;
        None without co-occurrence factors."""
        net = self.net
        if net.cooc is None or self.cooc is None:
            return None
        return net.cooc(torch.from_numpy(self.cooc.features[rows.cpu().numpy()]).to(self.device))

    def _text_rows(self, rows: torch.Tensor, live: Mapping[int, float] | None = None) -> torch.Tensor:
        """P(tower(rows) [+ F(modal)]) [+ A(co-occurrence factors)]: the content part of the items'
        vectors, everything but the id residual (and so also what `w_text` reads)."""
        net = self.net
        out = net.tower.projected(net.proj, rows, live)
        if net.fuse is not None and self._modal is not None:
            modal = torch.from_numpy(self._modal[rows.cpu().numpy()]).to(self.device)
            out = out + net.proj(net.fuse(modal))
        cooc = self.cooc_part(rows)
        return out if cooc is None else out + cooc

    def item_vectors(
        self,
        rows: torch.Tensor,
        grad_rows: Mapping[int, float] | None,
        drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors and scoring biases of `rows`, with gradients; a tower with an expensive part
        (transformer layers) runs it on `grad_rows` only and caches the rest (`models.towers`).
        Rows where `drop` is True get no id residual or bias (`FineTuneOptions.id_dropout`)."""
        net = self.net
        text = self._text_rows(rows, grad_rows)
        return net.items(text, rows, self.popularity.feature(rows.cpu().numpy(), self.device), drop)

    @torch.no_grad()
    def refresh_items(self, full_tower: bool = False) -> None:
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
        rows = rows_tensor(range(n), self.device)
        text = torch.cat([self._text_rows(rows[i : i + 512]) for i in range(0, n, 512)])
        vec, bias = net.items(text, rows, self.popularity.feature(slice(0, n), self.device))
        net.train(was)
        self._live_vec = vec.float().cpu()
        self._live_aug = np.concatenate([self._live_vec.numpy(), bias.float().cpu().numpy()[:, None]], axis=1)
        self._live_stamp = np.full(n, self.trainer.steps, dtype=np.int64)

    def item_counts(self) -> np.ndarray:
        """Each item's slowest-decayed event count (what negatives are drawn by)."""
        return self.popularity.slowest()

    @torch.no_grad()
    def _freshen_live(self, rows: Sequence[int]) -> None:
        """Recompute the live vectors of `rows` that a training step has moved since."""
        stale = sorted({r for r in rows if self._live_stamp[r] != self.trainer.steps})
        if not stale:
            return
        net = self.net
        was = net.training
        net.eval()
        idx = rows_tensor(stale, self.device)
        vec, _ = net.items(self._text_rows(idx), idx, self.popularity.feature(stale, self.device))
        net.train(was)
        self._live_vec[stale] = vec.float().cpu()
        self._live_stamp[stale] = self.trainer.steps

    # ---- user vectors ------------------------------------------------------------------------------
    def profile_tensor(self, user_ids: Sequence[str]) -> torch.Tensor:
        texts = [self.profiles.get(u) for u in user_ids]
        out = torch.zeros(len(user_ids), self.net.tower.base_dim, device=self.device)
        known = [i for i, t in enumerate(texts) if t]
        if known:
            enc = self.encoder.encode([texts[i] for i in known])  # type: ignore[misc]
            out[known] = torch.from_numpy(enc).to(self.device)
        return out

    def long_tensor(self, longs: Sequence[np.ndarray | None]) -> torch.Tensor:
        d = self.net.dim
        arr = np.zeros((len(longs), d), dtype=np.float32)
        for i, lt in enumerate(longs):
            if lt is not None:
                arr[i] = lt
        return torch.from_numpy(arr).to(self.device)

    def current_episodes(self, user_ids: Sequence[str]) -> list[Episode]:
        return [Episode(u, list(self.users[u].recent), self.users[u].long_term) for u in user_ids]

    def _published_vec(self) -> torch.Tensor:
        return torch.from_numpy(self.versions.item_aug[:, :-1]).to(self.device)

    def serving_tensors(self, episodes: Sequence[Episode]) -> EpisodeTensors:
        """Behaviour tensors over the published item vectors (searches through the served tower)."""
        return episode_tensors(
            episodes,
            self._published_vec(),
            self.catalog.index,
            lambda texts: self.versions.call(self.net, "texts", texts),
        )

    @torch.no_grad()
    def encode_users(self, user_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Published user vectors (U, d) and their attention over the recent behaviours (U, T):
        the serving weights over the published item vectors."""
        net = self.net
        was = net.training
        net.eval()
        episodes = self.current_episodes(user_ids)
        t = self.serving_tensors(episodes)
        u, weights = self.versions.call(
            net,
            "user",
            *t.as_args(),
            *newest_queries(episodes, self.device),
            self.long_tensor([ep.long_term for ep in episodes]),
            self.profile_tensor(user_ids),
        )
        net.train(was)
        return u, weights

    def _refresh_users(self, user_ids: Sequence[str]) -> None:
        user_ids = [u for u in user_ids if u in self.users]
        if not user_ids:
            return
        with torch.no_grad():
            scale = float(self.versions.call(self.net, "scale"))
            for i in range(0, len(user_ids), 512):
                part = user_ids[i : i + 512]
                u = self.encode_users(part)[0].float().cpu().numpy() * scale
                for uid, vec in zip(part, u, strict=True):
                    self._uvec[uid] = np.append(vec, np.float32(1.0)).astype(np.float32)

    def _cold_vector(self, user_id: str, first_query: str | None = None) -> tuple[np.ndarray, str]:
        """A vector for a user without history: first search text, profile, or the popularity prior."""
        with torch.no_grad():
            scale = float(self.versions.call(self.net, "scale"))
            if first_query:
                v = self.versions.call(self.net, "texts", [first_query])[0]
                return np.append(v.float().cpu().numpy() * scale, 1.0).astype(np.float32), "search"
            if user_id in self.profiles:
                v = self.versions.call(self.net, "profile", self.profile_tensor([user_id]))[0]
                return np.append(v.float().cpu().numpy() * scale, 1.0).astype(np.float32), "profile"
        return self.prior_vector(), "popularity"

    # ---- learning --------------------------------------------------------------------------------
    def _observe(self, events: Sequence[Event]) -> tuple[list[Episode], dict[str, int], dict[str, str]]:
        index = self.catalog.index
        rows = (index.get(e.target_item) for e in events if e.target_item is not None)
        self._freshen_live([r for r in rows if r is not None])
        return observe_batch(
            events,
            self.users,
            index,
            self._live_vec.numpy(),
            self.opts,
            profiled=self.profiles.keys(),
            cooc=self.cooc,
            rating_sums=self._user_bias,
        )

    def user_offset(self, user_id: str) -> float:
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
        if self._live_stamp[row] != self.trainer.steps:
            # Asked per event (the backtest asks every rating): one refresh per step, not per row.
            with cpu_threads(self.device, self.opts.cpu_threads):
                self.refresh_items()
        dot = float(vec[:-1] @ self._live_vec[row].numpy()) / scale
        with torch.no_grad():
            pred = (
                float(self.net.mu)
                + self.user_offset(user_id)
                + float(self.net.rating_bias[row])
                + float(self.net.rating_scale) * dot
            )
        return float(min(max(pred, self.opts.rating_min), self.opts.rating_max))

    def learn(self, events: Sequence[Event]) -> BatchResult:
        with cpu_threads(self.device, self.opts.cpu_threads):
            return self._learn(events)

    def _learn(self, events: Sequence[Event]) -> BatchResult:
        episodes, touched, cold = self._observe(events)
        if events:
            self.learned_through = max(self.learned_through, max(e.ts for e in events))
        loss = None
        dp = self.trainer.dp
        admitted: set[str] = set()
        if dp is not None and self.train_shared and not dp.exhausted:
            # DP: only admitted events train shared parameters (per-user caps); the others
            # still move their user's own state and vector.
            admitted = dp.admit(events)
            for ep in episodes:
                ep.targets = [t for t in ep.targets if t.event_id in admitted]
        if self.train_shared:
            self.trainer.add(episodes)
            loss = self.trainer.train(self.trainer.paid_for(events, episodes), self.device)
            if dp is not None and self.trainer.released_users:
                self._dp_collect_counts(events, admitted, self.trainer.released_users)
                self.trainer.released_users = set()
        # Popularity counts move after the step: training saw the counts as they were before.
        self._count_popularity(events)
        self.batches += 1
        snapshot = None
        if self._publish_is_due():
            snapshot = self._publish()
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

    def _count_popularity(self, events: Sequence[Event]) -> None:
        if self.trainer.dp is not None:
            self.popularity.decay_by(float(self.opts.dp_clock_events_per_batch))
        else:
            self.popularity.update([e.ts for e in events], [self.catalog.row(e.target_item) for e in events])

    # ---- rollback and publishing ---------------------------------------------------------------
    def publish_due(self, n_events: int = 0) -> bool:
        """Whether learning `n_events` more events publishes a version (the worker refreshes its
        catalog first, so that the version it leaves behind has every item stored so far)."""
        dp = self.trainer.dp
        # Under DP a batch is one release (at most): one step ahead.
        ahead = 1 if dp is not None else self.trainer.steps_due(max(n_events, 1))
        return self._publish_is_due(steps_ahead=ahead)

    def _publish_is_due(self, steps_ahead: int = 0) -> bool:
        o = self.opts
        dp = self.trainer.dp
        if not self.train_shared or (dp is not None and dp.exhausted):
            return False
        steps = self.trainer.steps_since_publish + steps_ahead
        if dp is not None:
            # Each DP version releases noisy counts, and the noise adds up over releases: the
            # floor holds whatever the clock says, or a slow stream would publish a version
            # every `publish_every_s` with a step or two of counts under a full release of noise.
            return steps >= max(o.publish_every_steps, o.dp_publish_every_steps)
        waited = time.monotonic() - self.versions.last_publish
        return steps >= o.publish_every_steps or waited >= o.publish_every_s

    # ---- DP popularity counts (models/privacy.py) ----------------------------------------------
    def _dp_collect_counts(self, events: Sequence[Event], admitted: set[str], released: set[str]) -> None:
        """Remember the catalog rows of the admitted events of the users in a release."""
        for e in events:
            if e.event_id not in admitted or e.user_id not in released:
                continue
            row = self.catalog.row(e.target_item)
            if row is not None:
                self.popularity.hold(e.user_id, row)

    def privacy_state(self) -> dict[str, float]:
        dp = self.trainer.dp
        return dp.state() if dp is not None else {}

    def weights(self) -> bytes:
        """The trainable state (including the item residuals), serialised (`versions.pack_weights`)."""
        dp = self.trainer.dp
        # DP: the accountant's counts (no user ids) and the counts' noise floor travel with the
        # weights, so a restart goes on from the published state.
        extra: dict[str, Any] = {}
        if dp is not None:
            extra = {"dp": dp.checkpoint(), "dp_pop_var": torch.from_numpy(self.popularity.noise_var.copy())}
        if self._cooc_chain is not None:
            extra.update(self._cooc_chain.entries(len(self.catalog)))
        return pack_weights(self.net, self.catalog.ids, self.config(), self.popularity.counts, extra)

    def weights_base(self) -> str | None:
        """The version whose weights these weights need besides their own (the co-occurrence
        checkpoint their pairs add to); None when they stand alone."""
        return None if self._cooc_chain is None else self._cooc_chain.weights_base()

    def _saved_rows(self, ids: Sequence[str]) -> np.ndarray:
        """This catalog's row of each saved item id (-1: not in this catalog)."""
        n = len(self.catalog)
        out = np.full(len(ids), -1, dtype=np.int64)
        for j, item_id in enumerate(ids):
            row = self.catalog.row(item_id)
            if row is not None and row < n:
                out[j] = row
        return out

    def load_weights(self, blob: bytes, base: Callable[[str], bytes | None] | None = None) -> None:
        """Restore weights published earlier (rows matched by item id; unknown items keep zeros).
        `base` gives the weights of another version, when these need them (`weights_base`)."""
        saved = unpack_weights(blob, self.device)
        state = dict(saved["net"])
        rows = self._saved_rows(saved["item_ids"])
        known = rows >= 0
        dst_rows, src_rows = torch.from_numpy(rows[known]), torch.from_numpy(np.flatnonzero(known))
        for key in ("item_emb", "item_bias", "rating_bias"):
            src = state.pop(key)
            dst = getattr(self.net, key).data.clone()
            dst[dst_rows.to(dst.device)] = src[src_rows.to(src.device)]
            state[key] = dst
        if "popularity" in saved:
            self.popularity.counts[rows[known]] = saved["popularity"].numpy()[known]
        dp = self.trainer.dp
        if dp is not None and "dp" in saved:
            dp.restore(saved["dp"])
            if "dp_pop_var" in saved:
                self.popularity.noise_var = saved["dp_pop_var"].cpu().numpy().astype(np.float64)
        cooc_map = self.net.cooc.weight.shape if self.net.cooc is not None else None
        if "cooc.weight" in state and tuple(state["cooc.weight"].shape) != cooc_map:
            # Weights published at another co-occurrence rank (or with none): the factors and
            # their map start afresh rather than refuse the rest.
            log.warning(
                "co-occurrence rank changed (saved map %s, this model %s): the factors start afresh",
                tuple(state["cooc.weight"].shape),
                cooc_map,
            )
            state.pop("cooc.weight")
        elif self._cooc_chain is not None and "cooc_factors" in saved:
            # A follower (`train_shared` False) serves the factors and counts nothing it publishes.
            fetch = base if self.train_shared else None
            self._cooc_chain.restore(saved, rows, fetch, self._saved_rows, self.device)
        if "fuse.weight" in state and self.net.fuse is None:
            state.pop("fuse.weight")
        self.net.load_state_dict(state, strict=False)
        self.trainer.make_optimizer()
        self._publish(initial=True)  # the restored weights are the version user vectors name now
        self._refresh_users(list(self.users))

    def _publish(self, initial: bool = False) -> ModelSnapshot | None:
        """A new model version: re-encode every item from the cached base with the current weights.

        Users touched by the batch get vectors against the new version in the same result;
        the others keep the (older) version their stored vectors name.
        """
        # Trained transformer layers: every item through them only every few publishes (the
        # items of each step are refreshed as they are trained); the adapter is cheap, always.
        full = initial or self.versions.publishes % self.opts.tower_refresh_every == 0
        if not initial:
            dp = self.trainer.dp
            if dp is not None:
                # Once per publish rather than per step: the noise on every row adds up over
                # releases, and per step it drowned the counts (ML-100K, first 3,000 events:
                # recall@10 0.0057 with per-step releases vs 0.038 with noiseless counts). A user
                # is in a count release only if they were in a gradient release since the last
                # one, so the accountant's two releases per participation still bound it.
                self.popularity.release(dp, len(self.catalog))
            if self._cooc_chain is not None:
                self._cooc_chain.before_publish(self.versions.publishes)
        self.refresh_items(full_tower=full)
        blob = self.weights()
        needs = self.weights_base()
        version = version_id(self.spec, blob, self.encoder.version)
        if self._cooc_chain is not None:
            self._cooc_chain.published(version)
        # What a snapshot of this version carries: the very bytes its id digests. (Packed again
        # later, a version that is a co-occurrence checkpoint would carry the pairs since it
        # instead, and name itself as the checkpoint.)
        self._published_weights = (blob, needs)
        trainer = self.trainer
        trainer.steps_since_publish = 0
        previous = self.versions.publish(self.net, self._live_aug, version, initial=initial)
        if trainer.good_state is None or self.versions.publishes % self.opts.good_state_every == 0:
            trainer.good_state = trainer.capture()
        if initial or previous is None:
            return None
        metrics = {"batches": float(self.batches), "rollbacks": float(trainer.rollbacks)}
        if math.isfinite(self.learned_through):
            metrics["learned_through_ts"] = self.learned_through
        return self._snapshot(blob, needs, {**metrics, **self.privacy_state()})

    def snapshot(self) -> ModelSnapshot:
        return self._snapshot(*self._published_weights)

    def _snapshot(
        self, blob: bytes, weights_base: str | None, metrics: Mapping[str, float] | None = None
    ) -> ModelSnapshot:
        """The published version as a snapshot: its item vectors and these weights."""
        return ModelSnapshot(
            version=self.versions.version,
            parent=self.versions.parent,
            config=self.config(),
            item_ids=list(self.catalog.ids),
            item_vectors=self.versions.item_aug.copy(),
            metrics=dict(metrics or {}),
            weights=blob,
            weights_base=weights_base,
            prior=self.prior_vector(),
        )

    def prior_vector(self) -> np.ndarray:
        # A zero interest part leaves only the item bias: time-decayed popularity.
        return np.append(np.zeros(self.net.dim, dtype=np.float32), 1.0).astype(np.float32)

    def rebuild_user(self, user_id: str, events: Sequence[Event]) -> None:
        """Rebuild a user's state from their events (time order) without training on them."""
        profile = self.profiles.get(user_id)
        self.forget_user(user_id)
        if profile is not None:
            self.profiles[user_id] = profile
        self._observe([e for e in events if e.user_id == user_id])
        self._refresh_users([user_id])

    # ---- explain ------------------------------------------------------------------------------
    def explain(self, user_id: str, top: int = 10, ig_steps: int = 16) -> list[dict[str, Any]]:
        """The behaviours that contributed most to the user's vector (`explain.explain_user`)."""
        return explain_user(self, user_id, top, ig_steps)


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
