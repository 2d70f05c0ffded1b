"""Samplers and their cost: the teacher's Euler flow sampler and effective NFE."""

from __future__ import annotations

from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t (B,)) -> velocity


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dt = v from grid[0] (noise) to grid[-1] (data): x <- x - (t - t') v(x, t).

    `grid` is a float64 tensor listed from noise to data (see `schedules.shifted_grid`); the step
    arithmetic runs in float64 time, the network in the noise's dtype.
    """
    x = noise
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float64)
        x = x - (t - t_next) * velocity(x, t_batch).to(x.dtype)
    return x


def teacher_nfe(steps: int, guidance_scale: float) -> int:
    """Network evaluations of the teacher sampler: one per step, two with CFG (batched)."""
    return steps * (2 if guidance_scale != 1.0 else 1)
