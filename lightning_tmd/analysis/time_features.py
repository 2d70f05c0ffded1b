"""Random students whose time MLPs are smooth, for checks of the derivative d/ds (docs/method.md, Stage 1)."""

from __future__ import annotations

import math

import torch

from lightning_tmd.nets.tmd_student import TMDStudent


def keep_slow_time_features(student: TMDStudent, max_frequency: float = 0.012) -> TMDStudent:
    """Drop the sinusoidal time features faster than `max_frequency` rad per timestep unit from both time MLPs
    (Wan's and the gap embedding's), in place.

    A central difference with delta = 5e-3 (5 units on Wan's 0-1000 scale) cannot resolve sinusoids of ~1 rad
    per unit, which random weights use as much as slow ones; trained time MLPs are smooth."""
    half = student.wan.config.freq_dim // 2
    omega = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    keep = (omega <= max_frequency).repeat(2)  # features are [cos, sin]
    with torch.no_grad():
        for embedder in (student.wan.transformer.condition_embedder.time_embedder, student.gap_embedding):
            embedder.linear_1.weight.mul_(keep.to(embedder.linear_1.weight.dtype))
    return student
