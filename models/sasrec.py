"""`sasrec`: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018), trained offline.

The standard recipe: learned item and positional embeddings, `blocks` causal self-attention
blocks (pre-norm, `heads` heads, width `dim`, dropout), the item embeddings shared as the
output layer, a target at every position. The loss is the full softmax over the catalog
(cross-entropy), which trains faster and ranks better than BCE with one sampled negative
(Klenitskiy & Vasilev, RecSys 2023); batches shrink with the catalog to bound the logits'
memory. Above `full_softmax_max_items` items (4,096) the softmax is sampled: 1,024 negatives
shared by a batch, drawn ~ count^0.75, log-Q corrected.

It is a baseline for the backtest's tail: `fit_offline(events)` (models.core.OfflineFit)
trains it on the events before the tail, with early stopping on each user's last item of
those events (leave-one-out, NDCG@10 over the catalog minus the user's other items), keeps
the best epoch and freezes it. During the replay `learn` only extends each user's sequence;
`predict_many` scores the catalog from the user's latest `max_len` items.

A user's sequence is their items in order of first interaction (repeats add nothing, as the
evaluator never ranks them). Inside a timestamp tie the order is unknown: training sequences
order tied items by a seeded shuffle, never by the log's order (which may follow item ids).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.baselines import _IdCatalog, _touched
from models.catalog import TextEncoder
from models.core import BatchResult, InterestModel, UserUpdate
from models.device import cpu_threads, seeded
from models.events import Event, Item
from models.registry import register

log = logging.getLogger(__name__)

LOGIT_BUDGET = 25_000_000  # batch x positions x items of one step's logits (~100 MB in float32)


class SASRecNet(nn.Module):
    def __init__(self, n_items: int, dim: int, blocks: int, heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items + 1, dim, padding_idx=0)  # row 0: padding
        self.positions = nn.Embedding(max_len, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, dim_feedforward=dim, dropout=dropout, batch_first=True, norm_first=True
            )
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(dim)
        self.scale = math.sqrt(dim)
        nn.init.normal_(self.items.weight, std=dim**-0.5)
        with torch.no_grad():
            self.items.weight[0].zero_()
        self.register_buffer("causal", torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), 1))

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """(batch, L) item indices, left-padded with 0 -> (batch, L, dim) states."""
        length = seqs.shape[1]
        keep = (seqs > 0).unsqueeze(-1).float()
        pos = torch.arange(length, device=seqs.device)
        x = self.items(seqs) * self.scale + self.positions(pos)[None]
        x = self.dropout(x) * keep
        mask = self.causal[:length, :length]
        for block in self.blocks:
            # Padding is zeroed after every block (as the reference implementation does) instead of
            # masking keys: a left-padded row would otherwise have no key to attend to.
            x = block(x, src_mask=mask) * keep
        return self.norm(x)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return states @ self.items.weight[1:].T


CPU = torch.device("cpu")


def _few_threads(n: int) -> contextlib.AbstractContextManager[None]:
    """At most `n` torch threads (never more than the process has) for the block."""
    return cpu_threads(CPU, max(1, min(n, torch.get_num_threads())))


class SASRecModel(InterestModel):
    name = "sasrec"

    def __init__(
        self,
        encoder: TextEncoder | None = None,
        *,
        arg: str | None = None,
        dim: int = 64,
        blocks: int = 2,
        heads: int = 1,
        max_len: int = 50,
        dropout: float = 0.2,
        lr: float = 3e-3,
        batch_size: int = 128,
        max_epochs: int = 100,
        patience: int = 5,
        threads: int = 1,
        progress: bool = True,  # a progress bar over epochs on stderr (early stopping ends it sooner)
        full_softmax_max_items: int = 4096,
        negatives: int = 1024,
        seed: int = 0,
        **_other_options: Any,  # options the runtime passes to every strategy; none apply here
    ) -> None:
        try:
            self.max_len = int(arg) if arg else max_len
        except ValueError:
            raise ValueError(f"sasrec:<max length> expected, got sasrec:{arg}") from None
        if self.max_len < 2:
            raise ValueError(f"sasrec max length must be >= 2, got {self.max_len}")
        self.width, self.n_blocks, self.heads, self.dropout = dim, blocks, heads, dropout
        self.lr, self.batch_size, self.max_epochs, self.patience = lr, batch_size, max_epochs, patience
        self.threads, self.seed, self.progress = threads, seed, progress
        self.full_softmax_max_items, self.negatives = full_softmax_max_items, negatives
        self.catalog = _IdCatalog()
        self.net: SASRecNet | None = None
        self.n_trained_items = 0  # items the network has embeddings for (catalog rows below this)
        self.seqs: dict[str, list[int]] = {}  # user -> catalog rows in order of first interaction
        self.had: dict[str, set[int]] = {}
        self.users: dict[str, int] = {}
        self.fit_report: dict[str, Any] = {}
        self.prior: np.ndarray | None = None  # log popularity of the training events, for empty sequences

    @property
    def model_version(self) -> str:
        return f"sasrec-d{self.width}-b{self.n_blocks}-L{self.max_len}-s{self.seed}"

    @property
    def dim(self) -> int:
        return 0  # no vector space: predict_many scores the catalog

    def config(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "dim": self.width,
            "blocks": self.n_blocks,
            "heads": self.heads,
            "max_len": self.max_len,
            "dropout": self.dropout,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "loss": "full softmax"
            if len(self.catalog.ids) <= self.full_softmax_max_items
            else f"sampled softmax, {self.negatives} shared negatives ~ count^0.75, log-Q corrected",
            "seed": self.seed,
        }

    def upsert_items(self, items: Sequence[Item]) -> None:
        self.catalog.upsert(items)

    def item_ids(self) -> Sequence[str]:
        return self.catalog.ids

    def item_matrix(self) -> np.ndarray:
        return np.zeros((len(self.catalog.ids), 0), dtype=np.float32)

    def user_vector(self, user_id: str) -> np.ndarray | None:
        return None  # scores come from the sequence encoder (predict_many)

    # -- offline training ------------------------------------------------------------------

    def _sequences(self, events: Sequence[Event], rng: np.random.Generator) -> dict[str, list[int]]:
        """Users' items in order of first interaction; tied timestamps in a seeded random order."""
        keys = rng.random(len(events))
        order = sorted(range(len(events)), key=lambda k: (events[k].ts, keys[k]))
        seqs: dict[str, list[int]] = {}
        had: dict[str, set[int]] = {}
        for k in order:
            e = events[k]
            target = e.target_item
            row = self.catalog.index.get(target) if target is not None else None
            if row is None:
                continue
            seen = had.setdefault(e.user_id, set())
            if row not in seen:
                seen.add(row)
                seqs.setdefault(e.user_id, []).append(row + 1)  # 0 is padding
        return seqs

    def _windows(self, seqs: Mapping[str, list[int]]) -> np.ndarray:
        """Non-overlapping windows of max_len + 1 items from the end of each sequence, left-padded."""
        out: list[np.ndarray] = []
        width = self.max_len + 1
        for seq in seqs.values():
            end = len(seq)
            while end >= 2:
                part = seq[max(0, end - width) : end]
                row = np.zeros(width, dtype=np.int64)
                row[width - len(part) :] = part
                out.append(row)
                end -= self.max_len
        return np.stack(out) if out else np.zeros((0, width), dtype=np.int64)

    def _pad(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        mat = np.zeros((len(seqs), self.max_len), dtype=np.int64)
        for i, seq in enumerate(seqs):
            tail = list(seq)[-self.max_len :]
            if tail:
                mat[i, self.max_len - len(tail) :] = tail
        return torch.from_numpy(mat)

    def _validate(self, net: SASRecNet, inputs: list[list[int]], held: list[int]) -> float:
        """Mean NDCG@10 of each user's held-out item over the catalog minus their other items."""
        net.eval()
        total = 0.0
        with torch.no_grad():
            for lo in range(0, len(inputs), 256):
                batch = inputs[lo : lo + 256]
                scores = net.logits(net(self._pad(batch))[:, -1])
                for i, seq in enumerate(batch):
                    scores[i, torch.as_tensor([s - 1 for s in seq])] = -torch.inf
                target = torch.as_tensor([h - 1 for h in held[lo : lo + 256]])
                true = scores[torch.arange(len(batch)), target]
                rank = (scores > true[:, None]).sum(1)
                total += float(torch.where(rank < 10, 1.0 / torch.log2(rank.float() + 2), 0.0).sum())
        net.train()
        return total / max(len(inputs), 1)

    def fit_offline(self, events: Sequence[Event]) -> Mapping[str, Any]:
        started = time.perf_counter()
        rng = np.random.default_rng(self.seed)
        seqs = self._sequences(events, rng)
        # Leave-one-out: each user's last item (users with at least 3) is held out for early stopping.
        held_users = [u for u, s in seqs.items() if len(s) >= 3]
        train = {u: (s[:-1] if len(s) >= 3 else s) for u, s in seqs.items()}
        val_inputs = [train[u] for u in held_users]
        val_held = [seqs[u][-1] for u in held_users]
        windows = self._windows(train)
        n_items = len(self.catalog.ids)
        sampled = n_items > self.full_softmax_max_items
        width = self.negatives + 1 if sampled else n_items
        batch = max(8, min(self.batch_size, LOGIT_BUDGET // max(1, self.max_len * width)))
        # Sampled softmax for big catalogs: shared negatives drawn ~ count^0.75 and every logit
        # corrected by -log q (Yi et al., RecSys 2019), so popular items are not over-penalised.
        counts = np.ones(n_items)
        for seq in train.values():
            np.add.at(counts, np.asarray(seq) - 1, 1.0)
        q = counts**0.75
        q /= q.sum()
        log_q = torch.from_numpy(np.log(q)).float()
        # Its own seed, and the global RNG restored after: other models' numbers do not depend
        # on whether this one ran beside them.
        with seeded(CPU, self.seed), _few_threads(self.threads):
            net = SASRecNet(n_items, self.width, self.n_blocks, self.heads, self.max_len, self.dropout)
            opt = torch.optim.Adam(net.parameters(), lr=self.lr, betas=(0.9, 0.98))
            best, best_epoch, best_state, history = -1.0, 0, None, []
            net.train()
            # A bar on a terminal; in a log (no terminal), one plain line per epoch instead of
            # carriage returns piling up on one line.
            lines = self.progress and not sys.stderr.isatty()
            bar = tqdm(
                total=self.max_epochs,
                desc="sasrec offline fit",
                unit="epoch",
                disable=not self.progress or lines,
            )
            for epoch in range(1, self.max_epochs + 1):
                perm = rng.permutation(len(windows))
                losses = []
                for lo in range(0, len(perm), batch):
                    rows = torch.from_numpy(windows[perm[lo : lo + batch]])
                    inp, tgt = rows[:, :-1], rows[:, 1:]
                    valid = tgt > 0
                    states = net(inp)[valid]
                    target = tgt[valid] - 1
                    if sampled:
                        neg = torch.from_numpy(rng.choice(n_items, size=self.negatives, p=q))
                        emb = net.items.weight[1:]
                        pos_logit = (states * emb[target]).sum(-1, keepdim=True) - log_q[target][:, None]
                        neg_logit = states @ emb[neg].T - log_q[neg][None, :]
                        neg_logit = neg_logit.masked_fill(neg[None, :] == target[:, None], -torch.inf)
                        logits = torch.cat([pos_logit, neg_logit], dim=1)
                        loss = nn.functional.cross_entropy(logits, torch.zeros_like(target))
                    else:
                        loss = nn.functional.cross_entropy(net.logits(states), target)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        net.items.weight[0].zero_()
                    losses.append(float(loss.detach()))
                score = self._validate(net, val_inputs, val_held) if val_inputs else 0.0
                history.append(
                    {"epoch": epoch, "loss": float(np.mean(losses)) if losses else None, "val_ndcg@10": score}
                )
                log.info(
                    "sasrec epoch %d: loss %.4f, validation NDCG@10 %.4f (%.1f s)",
                    epoch,
                    history[-1]["loss"] or float("nan"),
                    score,
                    time.perf_counter() - started,
                )
                bar.set_postfix(val_ndcg10=f"{score:.4f}", best_epoch=best_epoch if score <= best else epoch)
                bar.update(1)
                if lines:
                    took = time.perf_counter() - started
                    print(
                        f"sasrec offline fit: epoch {epoch}/{self.max_epochs} (stops after {self.patience} "
                        f"without gain), validation NDCG@10 {score:.4f}, best epoch "
                        f"{best_epoch if score <= best else epoch}, {took / epoch:.1f} s/epoch",
                        file=sys.stderr,
                        flush=True,
                    )
                if score > best:
                    best, best_epoch = score, epoch
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                elif epoch - best_epoch >= self.patience:
                    break
            bar.close()
            if best_state is not None:
                net.load_state_dict(best_state)
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
        self.net = net
        self.n_trained_items = n_items
        self.prior = np.log(counts)  # counts start at 1: log 0 for items never seen in training
        self.fit_report = {
            "events": len(events),
            "users": len(seqs),
            "train_windows": len(windows),
            "validation_users": len(held_users),
            "batch_size": batch,
            "epochs": len(history),
            "best_epoch": best_epoch,
            "best_val_ndcg@10": best,
            "seconds": time.perf_counter() - started,
            "history": history,
        }
        return self.fit_report

    # -- replay ----------------------------------------------------------------------------

    def learn(self, events: Sequence[Event]) -> BatchResult:
        for e in events:
            self.users[e.user_id] = self.users.get(e.user_id, 0) + 1
            target = e.target_item
            row = self.catalog.index.get(target) if target is not None else None
            if row is None or row >= self.n_trained_items:
                continue
            had = self.had.setdefault(e.user_id, set())
            if row not in had:
                had.add(row)
                self.seqs.setdefault(e.user_id, []).append(row + 1)
        updates = {
            u: UserUpdate(user_id=u, vector=np.zeros(0, dtype=np.float32), n_applied=n, last_event_ts=ts)
            for u, (n, ts) in _touched(events).items()
        }
        return BatchResult(updates=updates, model_version=self.model_version)

    def predict_many(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.catalog.ids)
        scores = np.zeros((len(user_ids), n), dtype=np.float64)
        known = np.array([bool(self.seqs.get(u)) and self.net is not None for u in user_ids], dtype=bool)
        if self.prior is not None:
            # A user with no item yet (e.g. the rest of their first micro-batch): the attention has
            # nothing to read, so the training set's popularity ranks, as a deployed SASRec would
            # fall back; scoring them at random would hide what the encoder does for everyone else.
            scores[~known, : self.n_trained_items] = self.prior[None, :]
        if known.any():
            assert self.net is not None
            rows = np.flatnonzero(known)
            with torch.no_grad(), _few_threads(self.threads):
                for lo in range(0, len(rows), 512):
                    part = rows[lo : lo + 512]
                    states = self.net(self._pad([self.seqs[user_ids[r]] for r in part]))[:, -1]
                    scores[part, : self.n_trained_items] = self.net.logits(states).numpy()
            if self.n_trained_items < n:
                # Items added after training have no embedding: below every trained item.
                scores[:, self.n_trained_items :] = scores[:, : self.n_trained_items].min(initial=0.0) - 1.0
        if self.prior is not None:
            known[:] = True
        return scores, known

    def predict(self, user_id: str) -> np.ndarray | None:
        scores, known = self.predict_many([user_id])
        return scores[0] if known[0] else None

    def get_user_state(self, user_id: str) -> dict[str, Any] | None:
        if user_id not in self.users:
            return None
        ids = self.catalog.ids
        return {"sequence": [ids[r - 1] for r in self.seqs.get(user_id, [])], "n_events": self.users[user_id]}

    def set_user_state(self, user_id: str, state: Mapping[str, Any]) -> None:
        index = self.catalog.index
        seq = [index[i] + 1 for i in state.get("sequence", []) if i in index]
        self.seqs[user_id] = seq
        self.had[user_id] = {s - 1 for s in seq}
        self.users[user_id] = int(state.get("n_events", 0))

    def forget_user(self, user_id: str) -> None:
        for store in (self.seqs, self.had, self.users):
            store.pop(user_id, None)

    def known_users(self) -> Sequence[str]:
        return list(self.users)


register("sasrec", SASRecModel)
