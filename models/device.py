"""Device choice, mixed precision and determinism for the trainable models."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from models.encoder import pick_device

__all__ = ["autocast", "cpu_threads", "pick_device", "seeded", "set_deterministic"]


def set_deterministic(seed: int, deterministic: bool = True) -> None:
    """Seed every generator; with `deterministic`, also ask torch for deterministic kernels.

    Same seed, same data, same batches -> the same numbers, on CPU always and on CUDA
    with deterministic kernels (slower; hence a switch).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """bf16 autocast on CUDA (halves memory traffic, no loss scaling needed); a no-op on CPU."""
    if enabled and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int) -> Iterator[None]:
    """Run the block with `n` torch threads on CPU (0 or a CUDA device: unchanged)."""
    if n <= 0 or device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Run the block on generators seeded with `seed` (CPU, and `device` if it is a GPU), then
    put back the states they had: a step's random numbers depend on its seed alone.

    Not `torch.manual_seed`: it also seeds every CUDA device lazily, and without CUDA that
    records a stack trace on each call (2-4 % of a small CPU training step in a py-spy profile).
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
