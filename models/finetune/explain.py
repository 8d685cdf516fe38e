"""Why a user's vector looks the way it does: each behaviour's share of it (`istream explain`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.finetune.episodes import newest_queries
from models.user_state import SIGNAL_CLICK, SIGNAL_SEARCH

if TYPE_CHECKING:
    from models.finetune.model import FineTunedModel


def explain_user(
    model: FineTunedModel, user_id: str, top: int = 10, ig_steps: int = 16
) -> list[dict[str, Any]]:
    """The behaviours that contributed most to the user's vector, with their share of it.

    The vector is u = W_s·state(behaviours) + W_l·long-term + W_p·profile. The long-term and
    profile parts are linear: their share is their projection on u, part·u/|u|². The
    sequence state is not (self-attention), so the short-term share is split over the
    behaviours by integrated gradients of state·u/|u|² along each behaviour's vector from
    zero (16 steps), scaled to add up to that share: behaviours, long-term and profile add
    up to 1. `attention` is the last block's attention of the user's state on each behaviour.
    """
    state = model.users.get(user_id)
    if state is None:
        return []
    net = model.net
    was = net.training
    net.eval()
    call = model.versions.call
    with torch.no_grad():
        u, att = model.encode_users([user_id])
        ep = model.current_episodes([user_id])[0]
        vec, signal, ts, valid = model.serving_tensors([ep]).as_args()
        uu = u[0]
        denom = float(uu @ uu) or 1.0
        long_share = float(call(net, "long", model.long_tensor([state.long_term]))[0] @ uu / denom)
        profile = model.profile_tensor([user_id])
        prof_share = float(call(net, "profile", profile)[0] @ uu / denom)
    qu, qp = newest_queries([ep], model.device)
    zeros_long = torch.zeros(1, net.dim, device=model.device)
    zeros_prof = torch.zeros_like(profile)
    grads = torch.zeros_like(vec)
    for k in range(1, ig_steps + 1):
        x = (vec * (k / ig_steps)).detach().requires_grad_(True)
        part, _ = call(net, "user", x, signal, ts, valid, qu, qp, zeros_long, zeros_prof)
        (part[0] @ uu / denom).backward()
        assert x.grad is not None
        grads += x.grad
    raw = (vec * grads / ig_steps).sum(-1)[0].detach().float().cpu().numpy()
    net.train(was)
    short_share = 1.0 - long_share - prof_share
    total = float(raw.sum())
    shares = raw * (short_share / total) if abs(total) > 1e-12 else np.zeros_like(raw)
    out: list[dict[str, Any]] = []
    for k, b in enumerate(ep.behaviours):
        kind = "search" if b.signal == SIGNAL_SEARCH else "click" if b.signal == SIGNAL_CLICK else "rating"
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
    rest = out[top:]
    out = out[:top]
    if rest:  # what the behaviours beyond `top` add up to, so the list still sums to 1
        out.append({"kind": "other_behaviours", "weight": float(sum(r["weight"] for r in rest))})
    if abs(total) <= 1e-12:
        out.append({"kind": "sequence_state", "weight": short_share})
    out.append({"kind": "long_term", "weight": long_share})
    if user_id in model.profiles:
        out.append({"kind": "profile", "weight": prof_share, "query": model.profiles[user_id]})
    return out
