"""Time schedules: the shift map, shifted grids and random time sampling.

Convention: t in [0, 1], t = 1 is noise, x_t = (1 - t) x + t noise.
"""

from __future__ import annotations

import torch


def shift(t: torch.Tensor | float, gamma: float) -> torch.Tensor | float:
    """sigma_gamma(t) = gamma t / ((gamma - 1) t + 1); gamma > 1 moves mass towards noise."""
    return gamma * t / ((gamma - 1.0) * t + 1.0)


def steps_setting(value: int | None, default: int, name: str) -> int:
    """A sampler's number of steps: `value` when given, else `default`. Zero or a negative number is an error,
    never a silent default."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (or null for the default, {default}); got {value!r}")
    return value


def shift_setting(value: float | None, default: float, name: str) -> float:
    """A sampler's grid shift: `value` when given, else `default`; it must be positive."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number (or null for the default, {default}); got {value!r}")
    return float(value)


def shifted_grid(steps: int, gamma: float, t_max: float = 0.999) -> torch.Tensor:
    """`steps + 1` float64 times from `t_max` down to 0: uniform on [0, t_max], then shifted.

    The first time stays `t_max` (the start the model was trained for; shifting 0.999 would give
    0.9999), the interior points are shifted: `shifted_grid(2, 10)` = [0.999, 0.909, 0].
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = shift(torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64), gamma)
    grid[0] = t_max
    return grid


def sample_shifted_uniform(
    n: int,
    gamma: float,
    low: float = 0.001,
    high: float = 0.999,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """shift(U(low, high), gamma), float64, shape (n,)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    return shift(low + (high - low) * u, gamma)


def sample_logit_normal(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """sigmoid(N(mean, std^2)), float64, shape (n,) (the SD3 training density)."""
    z = torch.randn(n, generator=generator, dtype=torch.float64, device=device)
    return torch.sigmoid(mean + std * z)


def sample_train_times(
    n: int,
    kind: str,
    *,
    gamma: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Flow-matching training times: `kind` is "shifted_uniform" or "logit_normal"."""
    if kind == "shifted_uniform":
        return sample_shifted_uniform(n, gamma, generator=generator, device=device)
    if kind == "logit_normal":
        return sample_logit_normal(n, mean, std, generator=generator, device=device)
    raise ValueError(f"time sampling '{kind}' is unknown: use 'shifted_uniform' or 'logit_normal'")


def with_high_noise(t: torch.Tensor, fraction: float, low: float = 0.9, high: float = 0.999,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """t with each entry replaced, with probability `fraction`, by a draw from U(low, high): extra
    training near pure noise, where a clip's layout and motion are decided."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"high-noise fraction {fraction} must be in [0, 1]")
    if fraction == 0:
        return t
    u = torch.rand((2, len(t)), generator=generator, dtype=torch.float64, device=t.device)
    return torch.where(u[0] < fraction, low + (high - low) * u[1], t)


def broadcast_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (B,) -> (B, 1, ..., 1) in x's dtype, to scale a batch of clips per sample."""
    return t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def grid_floor(grid: torch.Tensor, s: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """For each s, the largest grid point <= s (< s when `strict`), float64 (App. A.2; docs/method.md Q7).

    `grid` may be listed in any order (the shifted grids run from noise to data).
    """
    points = grid.to(device=s.device, dtype=torch.float64).sort().values
    index = torch.searchsorted(points, s.to(torch.float64), right=not strict) - 1
    return points[index.clamp(min=0)]


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The flow interpolation x_t = (1 - t) x + t noise, with t (B,) per sample."""
    tb = broadcast_time(t, x)
    return (1 - tb) * x + tb * noise
