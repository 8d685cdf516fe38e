"""Item towers: how an item's (or a query's) text becomes a trainable base-space vector.

Three fine-tuning strategies, all built so that a training step never runs the
frozen part of the base again:

- `AdapterTower` (`adapter`): the base is frozen; its pooled outputs are cached
  per item and a small residual bottleneck MLP is trained on top.
- `TopLayersTower` (`top_layers:k`): the top k transformer layers are trained;
  the frozen lower layers' token outputs are cached per item, so a step runs
  only the top k layers.
- `TopLayersTower` with LoRA (`lora:r`): the same caching, but only rank-r
  adapters on the linear maps of the top layers are trained.

Every tower outputs vectors on the base's pooled scale (mean pooled, L2-normalised)
so the shared projection downstream sees the same input whatever the strategy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from models.catalog import Catalog, TextEncoder, item_text
from models.dropout import PackedDropout
from models.encoder import mean_pool


class ItemTower(nn.Module):
    """Base-space vectors for catalog rows and free texts, trainable where the strategy says."""

    #: True when the tower can run over the whole catalog with gradients on every step.
    cheap: bool = True
    strategy: str = "tower"

    def __init__(self, encoder: TextEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.base_dim = int(encoder.dim)

    def sync(self, catalog: Catalog, rows: Sequence[int]) -> None:
        """Refresh whatever is cached for these (new or changed) catalog rows."""

    def forward(self, rows: torch.Tensor, live: Mapping[int, float] | None = None) -> torch.Tensor:
        """Vectors of catalog `rows`, with gradients; towers with an expensive part run it
        only for the rows in `live` (row -> weight of its gradient through that part) and take
        the others from their cache."""
        raise NotImplementedError  # pragma: no cover - abstract

    def projected(
        self, proj: nn.Linear, rows: torch.Tensor, live: Mapping[int, float] | None = None
    ) -> torch.Tensor:
        """`proj(self(rows, live))`: the tower vectors of `rows` through the interest
        projection. Towers with a linear last layer fold it into `proj` (see `AdapterTower`)."""
        return proj(self(rows, live))

    def refresh(self) -> None:
        """Recompute whatever is cached from trained weights (every few publishes)."""

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.strategy}


class AdapterTower(ItemTower):
    """Frozen base, cached pooled outputs, a residual bottleneck adapter on top (starts as identity)."""

    strategy = "adapter"

    def __init__(self, encoder: TextEncoder, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__(encoder)
        self.down = nn.Linear(self.base_dim, hidden)
        self.up = nn.Linear(hidden, self.base_dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.drop = PackedDropout(dropout)
        self._base = torch.zeros(0, self.base_dim)
        self.hidden = hidden

    def sync(self, catalog: Catalog, rows: Sequence[int]) -> None:
        # The catalog already holds cached base encodings; a view is enough.
        self._base = torch.from_numpy(np.ascontiguousarray(catalog.encodings))

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.nn.functional.gelu(self.down(x)))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self._hidden(x))

    def inputs(self, rows: torch.Tensor, live: Mapping[int, float] | None = None) -> torch.Tensor:
        """The adapter's input for catalog `rows`: their cached base encodings. `live` is for
        towers with an expensive part in front of the adapter (`TopLayersTower`)."""
        base = self._base.to(self.up.weight.device)
        if len(rows) == len(base) and bool((rows == torch.arange(len(base), device=rows.device)).all()):
            return base  # the whole catalog in order (full softmax): no copy
        return base[rows]

    def forward(self, rows: torch.Tensor, live: Mapping[int, float] | None = None) -> torch.Tensor:
        """Tower vectors of catalog `rows`, with gradients through every row."""
        return self.adapt(self.inputs(rows, live))

    def projected(
        self, proj: nn.Linear, rows: torch.Tensor, live: Mapping[int, float] | None = None
    ) -> torch.Tensor:
        """P(x + W_up h + b_up) as P x + (P W_up) h + P b_up: the up-projection runs in the
        interest dimension (64) instead of the base's (384), forward and backward; the adapter
        was most of a training step's tower cost over a full-softmax catalog."""
        x = self.inputs(rows, live)
        w = proj.weight
        return proj(x) + self._hidden(x) @ (w @ self.up.weight).T + w @ self.up.bias

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        base = torch.from_numpy(self.encoder.encode(list(texts))).to(self.up.weight.device)
        return self.adapt(base)

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "adapter_hidden": self.hidden}


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers in common encoder architectures (BERT, RoBERTa, MiniLM, DistilBERT)."""
    for path in ("encoder.layer", "encoder.layers", "transformer.layer", "layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")


class _StopForward(Exception):
    pass


class LoRALinear(nn.Module):
    """A frozen linear map plus a trainable low-rank update B·A (B starts at zero: it starts as the base)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = (alpha if alpha is not None else 2.0 * rank) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.drop = PackedDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.drop(x) @ self.lora_a.T @ self.lora_b.T) * self.scale


def add_lora(module: nn.Module, rank: int, dropout: float = 0.0) -> int:
    """Replace every nn.Linear inside `module` by a LoRALinear; returns how many were wrapped."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, LoRALinear(child, rank, dropout=dropout))
            n += 1
        else:
            n += add_lora(child, rank, dropout)
    return n


class TopLayersTower(AdapterTower):
    """Train the top k layers (or LoRA adapters in them) on cached lower-layer token states,
    under the same residual adapter as `AdapterTower`.

    Needs a real transformers base (`encoder.model`, `encoder.tokenizer`). The
    encoder's own model stays untouched (it keeps producing the cached base
    encodings); the tower trains a copy of the top k layers.

    An item's vector is `adapt(top(states))`. The trained layers' pooled outputs are cached
    per item (they start equal to the base encodings, so the tower starts exactly as the
    adapter does); a step runs the layers only for the rows it is given as `live` and takes
    the other rows from that cache, while the adapter runs over every row with gradients.
    So `top_layers`/`lora` keep everything that makes the adapter learn (gradients through
    every softmax candidate) and the transformer part adds to it. Measured on ML-100K
    (first 30,000 events): without the adapter, the cache drifted away from the trained
    layers and they scored below popularity (docs/model.md).

    The layers run without dropout: their outputs are cached and written through from the
    training forward pass, so dropout noise would enter the cache; the adapter's dropout
    regularises.
    """

    cheap = False

    def __init__(
        self,
        encoder: Any,
        k: int = 1,
        lora_rank: int | None = None,
        dropout: float = 0.1,
        max_length: int | None = None,
        hidden: int = 128,
    ) -> None:
        if not hasattr(encoder, "model") or not hasattr(encoder, "tokenizer"):
            raise ValueError("top_layers/lora need a transformers base encoder, not a plain text encoder")
        super().__init__(encoder, hidden=hidden, dropout=dropout)
        layers = find_layers(encoder.model)
        if not 1 <= k <= len(layers):
            raise ValueError(f"k must be between 1 and {len(layers)} for this base, not {k}")
        self.k = k
        self.split = len(layers) - k
        self.top = nn.ModuleList(copy.deepcopy(layers[i]) for i in range(self.split, len(layers)))
        self.lora_rank = lora_rank
        if lora_rank is not None:
            for p in self.top.parameters():
                p.requires_grad_(False)
            add_lora(self.top, lora_rank, dropout=0.0)
        self.strategy = f"lora:{lora_rank}" if lora_rank is not None else f"top_layers:{k}"
        # Kept out of the module tree (a tuple is not registered): the frozen base is neither
        # trained, nor saved with the tower's weights, nor moved by `.to()`.
        self._frozen = (encoder.model, layers)
        self.max_length = max_length or getattr(encoder, "max_length", 64)
        # Per catalog row: lower-layer token states (S_i, H) and which text they came from.
        # `self._base` (the adapter's input) holds the trained layers' pooled outputs.
        self._states: list[torch.Tensor] = []
        self._texts: list[str] = []
        self.top.eval()

    def train(self, mode: bool = True) -> TopLayersTower:
        super().train(mode)
        self.top.eval()  # no dropout inside the cached layers (see the class docstring)
        return self

    # ---- the frozen lower part -------------------------------------------------------
    @torch.inference_mode()
    def lower(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Token states entering layer `split` for each text (padding removed)."""
        tok = self.encoder.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        base_model, layers = self._frozen
        device = next(base_model.parameters()).device
        tok = {k: v.to(device) for k, v in tok.items()}
        captured: dict[str, torch.Tensor] = {}

        def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _StopForward

        handle = layers[self.split].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            base_model(**tok)
        except _StopForward:
            pass
        finally:
            handle.remove()
        hidden = captured["h"].float().cpu()
        lengths = tok["attention_mask"].sum(1).tolist()
        return [hidden[i, : int(n)].clone() for i, n in enumerate(lengths)]

    def sync(self, catalog: Catalog, rows: Sequence[int]) -> None:
        n = len(catalog)
        while len(self._states) < n:
            self._states.append(torch.zeros(0, self.base_dim))
            self._texts.append("")
        if self._base.shape[0] < n:
            grow = torch.zeros(n - self._base.shape[0], self.base_dim, device=self._base.device)
            self._base = torch.cat([self._base, grow])
        todo = []
        for r in sorted(set(rows)):
            it = catalog.items[r]
            text = item_text(it.text, it.attrs)
            if self._texts[r] != text or self._states[r].shape[0] == 0:
                todo.append((r, text))
        chunk = 64
        for i in range(0, len(todo), chunk):
            part = todo[i : i + chunk]
            states = self.lower([t for _, t in part])
            with torch.no_grad():
                pooled = self.run_top(states)
            for j, ((r, text), state) in enumerate(zip(part, states, strict=True)):
                self._states[r] = state
                self._texts[r] = text
                self._base[r] = pooled[j].to(self._base.device)

    @torch.no_grad()
    def refresh(self, chunk: int = 256) -> None:
        """Every item through the trained layers again (the cache of their pooled outputs)."""
        n = len(self._states)
        if n:
            parts = [self.run_top(self._states[i : i + chunk]) for i in range(0, n, chunk)]
            self._base = torch.cat(parts).to(self._base.device)

    # ---- the trained top ----------------------------------------------------------------
    def _mask(self, mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        try:
            from transformers.masking_utils import create_bidirectional_mask

            out = create_bidirectional_mask(
                config=self._frozen[0].config, inputs_embeds=hidden, attention_mask=mask
            )
            if out is not None:
                return out
        except Exception:  # older/other transformers: fall back to the classic additive mask
            pass
        ext = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        return ext

    def run_top(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pooled, L2-normalised outputs of the trained layers (no adapter) for token states."""
        device = self.device
        longest = max(s.shape[0] for s in states)
        hidden = torch.zeros(len(states), longest, self.base_dim, device=device)
        mask = torch.zeros(len(states), longest, dtype=torch.long, device=device)
        for i, s in enumerate(states):
            hidden[i, : s.shape[0]] = s.to(device)
            mask[i, : s.shape[0]] = 1
        attn = self._mask(mask, hidden)
        for layer in self.top:
            out = layer(hidden, attn)
            hidden = out[0] if isinstance(out, tuple) else out
        pooled = mean_pool(hidden, mask)
        return torch.nn.functional.normalize(pooled, dim=-1)

    @property
    def device(self) -> torch.device:
        return self.up.weight.device

    def inputs(self, rows: torch.Tensor, live: Mapping[int, float] | None = None) -> torch.Tensor:
        """The trained layers' pooled outputs for `rows`: run now for the rows in `live` (with
        their gradient weights), from the cache for the others."""
        base = self._base.to(self.device)[rows]
        if live:
            rl = rows.tolist()
            pick = [i for i, r in enumerate(rl) if r in live]
            if pick:
                fresh = self.run_top([self._states[rl[i]] for i in pick])
                at = torch.as_tensor(pick, dtype=torch.long, device=base.device)
                w = torch.tensor([live[rl[i]] for i in pick], device=base.device)[:, None]
                # The value is `fresh`; its gradient into the layers is scaled by the row's weight.
                weighted = fresh.detach() + w * (fresh - fresh.detach())
                base = base.index_copy(0, at, weighted.to(base.dtype))
                # Written through: these rows are one optimisation step behind from now on,
                # the others since the last `refresh`.
                self._base[rows[at].to(self._base.device)] = fresh.detach().float().to(self._base.device)
        return base

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.adapt(self.run_top(self.lower(texts)))

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "k": self.k,
            "lora_rank": self.lora_rank,
            "adapter_hidden": self.hidden,
        }


def sample_live_rows(
    targets: Sequence[int], candidates: Sequence[int], budget: int, rng: np.random.Generator
) -> dict[int, float]:
    """Which rows run through the trained layers in a step, each with its gradient weight.

    The loss depends on every candidate, but the layers are too slow to run for all of
    them. Training them through the targets alone gives a biased gradient: it holds the
    pull of each positive towards its users but hardly any of the push away from the
    negatives, so the layers learn to move every item towards the average user (on ML-100K's
    first 15,000 events: NDCG@10 0.037 against 0.052 with the layers frozen). A stratified
    sample instead -- half the budget from the targets, half from the other candidates,
    each row weighted by its stratum's size over its sample's -- keeps the gradient unbiased.
    """
    targets = list(dict.fromkeys(targets))
    tset = set(targets)
    others = [r for r in candidates if r not in tset]
    k_targets = min(len(targets), max(budget // 2, budget - len(others)))
    k_others = min(len(others), budget - k_targets)  # a half, or what the targets leave
    out: dict[int, float] = {}
    for stratum, k in ((targets, k_targets), (others, k_others)):
        if k <= 0:
            continue
        pick = rng.choice(len(stratum), k, replace=False) if k < len(stratum) else range(len(stratum))
        for i in sorted(pick):
            out[stratum[i]] = len(stratum) / k
    return out


def build_tower(strategy: str, arg: str | None, encoder: Any, **options: Any) -> ItemTower:
    """`adapter`, `top_layers:k` (default k=1) or `lora:r` (default r=8, in the top `lora_layers` layers)."""
    dropout = float(options.get("dropout", 0.1))
    hidden = int(options.get("adapter_hidden", 128))
    if strategy == "adapter":
        return AdapterTower(encoder, hidden=hidden, dropout=dropout)
    if strategy == "top_layers":
        return TopLayersTower(encoder, k=_int_arg(arg, 1, strategy), dropout=dropout, hidden=hidden)
    if strategy == "lora":
        rank = _int_arg(arg, 8, strategy)
        k = int(options.get("lora_layers", 2))
        return TopLayersTower(encoder, k=k, lora_rank=rank, dropout=dropout, hidden=hidden)
    raise ValueError(f"unknown fine-tuning strategy {strategy!r}")


def _int_arg(arg: str | None, default: int, strategy: str) -> int:
    if not arg:
        return default
    try:
        value = int(arg)
    except ValueError:
        raise ValueError(f"{strategy}:{arg}: the argument must be a whole number") from None
    if value < 1:
        raise ValueError(f"{strategy}:{arg}: the argument must be at least 1")
    return value
