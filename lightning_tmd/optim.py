"""Optimisation helpers shared by the stage modules: learning-rate schedule and EMA of weights."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor


def warmup_then_decay(warmup_steps: int, schedule: str, total_steps: int | None,
                      min_ratio: float) -> Callable[[int], float]:
    """LR factor per step: linear warm-up, then constant or cosine decay to `min_ratio` at `total_steps`."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule '{schedule}' is unknown: use 'constant' or 'cosine'")
    if schedule == "cosine" and not total_steps:
        raise ValueError("lr_schedule 'cosine' needs trainer.max_steps")
    warmup = max(1, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def ema_with_warmup(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """`multi_avg_fn` for `AveragedModel`: EMA whose decay ramps up as min(decay, (1 + n) / (10 + n)),
    so the random initial weights do not linger in the average (0.999 ** 1000 would still be 37 %)."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for sharded in (False, True):  # FSDP: sharded parameters and plain buffers in separate foreach calls
            pairs = [(a, c) for a, c in zip(averaged, current) if isinstance(a, DTensor) == sharded]
            if pairs:
                torch._foreach_lerp_([a for a, _ in pairs], [c for _, c in pairs], weight)

    return update
