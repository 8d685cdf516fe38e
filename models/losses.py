"""Losses of the incremental training step. Pure tensor functions, easy to test in isolation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_rows(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row cross-entropy of each row's target among its candidates (see `sampled_softmax`)."""
    if mask is not None:
        mask = mask.clone()
        mask[torch.arange(len(target), device=mask.device), target] = False
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min / 2)
    return F.cross_entropy(logits, target, reduction="none")


def sampled_softmax(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each row's target among its candidates.

    `logits` (P, C), `target` (P,) column of the positive, `mask` (P, C) True where a
    candidate must not count as a negative (e.g. items the user already has); the
    target column itself is never masked. `weights` (P,) weigh the rows (a weighted mean).
    """
    per_row = softmax_rows(logits, target, mask)
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum().clamp(min=1e-12)


def bpr(
    pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor | None = None, per_row: bool = False
) -> torch.Tensor:
    """Bayesian personalised ranking: -log σ(pos - neg), over (P, N) negatives (valid marks real
    ones); `per_row`: each row's mean over its negatives, not the mean over all pairs."""
    loss = -F.logsigmoid(pos[:, None] - neg)
    if per_row:
        if valid is None:
            return loss.mean(dim=1)
        v = valid.to(loss.dtype)
        return (loss * v).sum(dim=1) / v.sum(dim=1).clamp(min=1.0)
    if valid is None:
        return loss.mean()
    valid = valid.to(loss.dtype)
    return (loss * valid).sum() / valid.sum().clamp(min=1.0)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Contrastive loss: query i should pick key i among all keys of the batch (cosine similarity)."""
    q = F.normalize(queries, dim=-1)
    k = F.normalize(keys, dim=-1)
    logits = q @ k.T / temperature
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def rating_mse(pred: torch.Tensor, rating: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, rating)
