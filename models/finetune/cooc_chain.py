"""The co-occurrence counts across published versions: which version holds them whole.

Every `checkpoint_every`-th publish packs the whole counts (a checkpoint); the versions
between carry only the pairs added since it, and name it (`weights_base`). A restart loads a
version's state on top of its checkpoint (`restore`), so it counts what the publisher counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from models.finetune.cooccurrence import CoOccurrence
from models.finetune.versions import unpack_weights

log = logging.getLogger(__name__)


def _arrays(entries: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.cpu().numpy() for k, v in entries.items() if k.startswith("cooc_") and k != "cooc_base"}


class CoOccurrenceChain:
    def __init__(self, cooc: CoOccurrence, checkpoint_every: int, max_pairs: int) -> None:
        self.cooc = cooc
        self.checkpoint_every = checkpoint_every
        self.max_pairs = max_pairs
        # The version whose weights hold the checkpoint that later versions' pairs add to, and
        # whether the next weights packed are a checkpoint themselves.
        self.base: str | None = None
        self.checkpoint = True

    def before_publish(self, publishes: int) -> None:
        """Ready the counts and factors for publish number `publishes` (0 = a checkpoint)."""
        self.checkpoint = publishes % self.checkpoint_every == 0
        if self.checkpoint and self.max_pairs:
            # Only here: the counts a checkpoint carries are the counts refits go on from, so a
            # restarted worker's are the publisher's, pair for pair.
            dropped = self.cooc.prune(self.max_pairs)
            if dropped:
                log.info(
                    "co-occurrence counts past %d pairs: the %d weakest dropped (cooc_max_pairs)",
                    self.max_pairs,
                    dropped,
                )
        self.cooc.refit()

    def published(self, version: str) -> None:
        """`version` was published: if it is a checkpoint, later versions' pairs add to it (a
        restored delta stays a delta)."""
        if self.checkpoint:
            self.base, self.checkpoint = version, False

    def entries(self, n_items: int) -> dict[str, Any]:
        """What the weights carry (`CoOccurrence.state`), and the checkpoint its pairs add to."""
        state = self.cooc.state(n_items, self.checkpoint)
        out: dict[str, Any] = {k: torch.from_numpy(v) for k, v in state.items()}
        if not self.checkpoint:
            out["cooc_base"] = self.base
        return out

    def weights_base(self) -> str | None:
        """The version whose weights these need besides their own; None when they stand alone."""
        return None if self.checkpoint else self.base

    def restore(
        self,
        saved: Mapping[str, Any],
        rows: np.ndarray,
        base: Callable[[str], bytes | None] | None,
        rows_of: Callable[[Sequence[str]], np.ndarray],
        device: torch.device | str,
    ) -> None:
        """The state of unpacked `saved` weights (`rows`: this catalog's row of each saved item).
        The checkpoint its pairs add to comes from `base` (version -> that version's weights;
        None: a follower, which serves the factors and counts nothing it publishes); `rows_of`
        maps that checkpoint's item ids onto this catalog."""
        checkpoint = None
        self.checkpoint = "cooc_counts" in saved
        if not self.checkpoint:
            self.base = saved.get("cooc_base")
            blob = base(self.base) if base is not None and self.base else None
            other = unpack_weights(blob, device) if blob is not None else {}
            if "cooc_counts" in other:
                checkpoint = (_arrays(other), rows_of(other["item_ids"]))
            elif base is not None:  # without it the caller will not train
                log.warning(
                    "the co-occurrence counts of version %s are not available: counting goes on "
                    "from the %d pairs since them",
                    self.base,
                    len(saved["cooc_pairs"]),
                )
        self.cooc.load(_arrays(saved), rows, checkpoint)
