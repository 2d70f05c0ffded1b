"""Wan's input and output conventions: 0-1000 timestep, EDM preconditioning, position planes, dtype casts."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors in `value` (a tensor, or a tuple / list of them) in `dtype`; the rest unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floats(v, dtype) for v in value)
    return value


@torch.no_grad()
def copy_full(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into `target`: a plain tensor, or this rank's shard of an FSDP-sharded
    (DTensor) one, cut from `full` locally (no communication) as the DTensor's placements cut it."""
    if tuple(target.shape) != tuple(full.shape):
        raise ValueError(f"shape {tuple(full.shape)} does not match the parameter's {tuple(target.shape)}")
    if isinstance(target, DTensor):
        full = full.to(target.device, target.dtype)
        shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(shard.to_local())
    else:
        target.copy_(full)


def weight_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a layer computes in without autocast: its weight's (bf16 when FSDP gathers it in bf16).
    The nets cast activations to it themselves, because FSDP does not cast their inputs: it would round the
    times too (parallel.py)."""
    return layer.weight.dtype


def wan_timestep(t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep input: 1000 t as float32, shape (B,)."""
    return (1000.0 * t).float()


PREDICTIONS = ("velocity", "edm")


def edm_coefficients(t: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of EDM's preconditioning on the flow path x_t = (1 - t) x + t noise, for the velocity
    target v = noise - x: v = c_skip x_t + c_out F. c_skip minimises E|v - c_skip x_t|^2 for data of second
    moment sigma_data^2 and c_out is the remaining RMS, so F's target has unit scale at every t:

        c_skip = (t - (1 - t) sd^2) / (t^2 + (1 - t)^2 sd^2),   c_out = sd / sqrt(t^2 + (1 - t)^2 sd^2).

    At t = 1 this is v = x_t + sd F (F predicts -x / sd; the input noise passes through exactly, where a
    velocity net has to copy it through every block); at t = 0 it is v = -x_t + F (F predicts the noise)."""
    s, sd2 = 1 - t, sigma_data**2
    denominator = t**2 + s**2 * sd2
    return (t - s * sd2) / denominator, sigma_data / denominator.sqrt()


def position_planes(frequencies: int) -> int:
    """Input channels that `fourier_position_planes` adds: sin and cos per axis (t, y, x) and frequency."""
    return 6 * frequencies


def fourier_position_planes(size: tuple[int, int, int], frequencies: int, device: torch.device | str = "cpu",
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(6F, T, H, W): sin and cos of 2^k (pi / 2) u for k < F, u in [-1, 1] the coordinate along each axis.
    The lowest frequency is monotone across the clip, so the first and last frame (or column) differ."""
    axes = [torch.linspace(-1, 1, n, device=device, dtype=torch.float64) for n in size]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, T, H, W)
    angles = torch.cat([grid * (math.pi / 2 * 2**k) for k in range(frequencies)])
    return torch.cat([angles.sin(), angles.cos()]).to(dtype)
