"""Samplers and their cost: the teacher's Euler flow sampler, the TMD sampler (Algorithm 1), the one-pass
step (Eq. 18) and effective NFE; the students' grids and updates are `lightning_tmd.schedulers`'."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lightning_tmd.schedulers import OnePassScheduler, TMDScheduler

if TYPE_CHECKING:
    from lightning_tmd.nets.text import PromptEncoder
    from lightning_tmd.nets.tmd_student import TMDStudent
    from lightning_tmd.nets.wan import WanNet

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t (B,)) -> velocity


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, grid: torch.Tensor, churn: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate dx/dt = v from grid[0] (noise) to grid[-1] (data): x <- x - (t - t') v(x, t).

    `grid` is a float64 tensor listed from noise to data (see `schedules.shifted_grid`); the step
    arithmetic runs in float64 time, the network in the noise's dtype. With `churn` > 0 the sampler is
    stochastic (EDM's churn, on the flow path): before each step, x_t is moved back to the noisier
    t_hat = min(t (1 + churn), grid[0]) with fresh noise from `generator` (`renoise`), then stepped
    from t_hat, so later steps can correct what earlier ones decided. Same NFE.
    """
    x = noise
    t_top = float(grid[0])
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        if churn > 0:
            t_hat = min(t * (1 + churn), t_top)
            x, t = renoise(x, t, t_hat, generator), t_hat
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float64)
        x = x - (t - t_next) * velocity(x, t_batch).to(x.dtype)
    return x


def renoise(x_t: torch.Tensor, t: float, t_hat: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t of the path x_t = (1 - t) x0 + t eps moved to the noisier t_hat >= t: scale the clean part by
    a = (1 - t_hat) / (1 - t) and add fresh noise of std sqrt(t_hat^2 - a^2 t^2)."""
    if t_hat <= t:
        return x_t
    a = (1 - t_hat) / (1 - t)
    fresh = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    return a * x_t + (t_hat**2 - (a * t) ** 2) ** 0.5 * fresh


def check_guidance_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    """A CFG interval (t_low, t_high) with 0 <= t_low < t_high <= 1, or None (guidance at every step)."""
    if interval is None:
        return None
    low, high = (float(v) for v in interval)
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"guidance_interval must be [t_low, t_high] with 0 <= t_low < t_high <= 1 (flow time, "
                         f"1 = noise), got {list(interval)}")
    return low, high


def guided_velocity_fn(cond: VelocityFn, cfg: VelocityFn | None = None,
                       interval: tuple[float, float] | None = None) -> tuple[VelocityFn, Callable[[], int]]:
    """The sampler's velocity with CFG limited to `interval` (Kynkäänniemi et al., 2024: guidance applied
    only in an interval of noise levels): `cfg` (one batched forward of 2B clips) where t_low <= t <= t_high
    (at every t when `interval` is None), the conditional `cond` elsewhere (everywhere when `cfg` is None).
    Returns (velocity, nfe) where nfe() counts the network evaluations so far, two per guided step."""
    calls = [0]

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guided = cfg is not None and (interval is None or interval[0] <= float(t[0]) <= interval[1])
        calls[0] += 2 if guided else 1
        return cfg(x, t) if guided else cond(x, t)

    return velocity, lambda: calls[0]


def effective_nfe(outer_steps: int, inner_steps: int, head_blocks: int, num_blocks: int) -> float:
    """Eq. 16, M (1 + (N - 1) H / L), for a TMD student with H of L blocks in its head
    (`TMDScheduler.effective_nfe`)."""
    scheduler = TMDScheduler(outer_steps, inner_steps, head_blocks=head_blocks, num_blocks=num_blocks)
    return scheduler.effective_nfe()


@torch.no_grad()
def tmd_sample(student: TMDStudent, context: torch.Tensor, noise: torch.Tensor, outer_grid: torch.Tensor,
               inner_grid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 1: per outer step, the backbone once, fresh inner noise y1, the N-step head rollout,
    then the deterministic transition x <- x - (t - t') y_hat. No CFG (guidance is distilled in)."""
    x = noise
    ones = torch.ones(len(x), dtype=torch.float64, device=x.device)
    for t, t_next in zip(outer_grid[:-1].tolist(), outer_grid[1:].tolist()):
        x = tmd_step(student, x, t * ones, t_next * ones, context, inner_grid, generator)
    return x


def tmd_step(student: TMDStudent, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, context: torch.Tensor,
             inner_grid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One outer step of Algorithm 1 (t, t_next of shape (B,)): the backbone once, fresh inner noise
    y1, the N-step head rollout, then x_{t'} = x_t - (t - t') y_hat (Eq. 4)."""
    main = student.backbone(x_t, t, context)
    y1 = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    y_hat = student.rollout(main, y1, inner_grid)
    return student.transition(x_t, t, t_next, y_hat).to(x_t.dtype)


def noise_seeded_generator(noise: torch.Tensor, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by the outer noise itself: the inner noise of a TMD sample run without a
    generator, so that a given starting noise always gives the same clips."""
    seed = int(noise.detach().double().abs().sum().item() * 1e3) % 2**62
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def one_pass_step(net: WanNet, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                  context: torch.Tensor) -> torch.Tensor:
    """Eq. 18, the one-pass (DMD2-v) student's outer step (`OnePassScheduler.outer_step`) from
    g = x_t - t v(x_t, t) (Eq. 17); re-uses the implied noise, no re-noising."""
    return OnePassScheduler.outer_step(x_t, t, t_next, net.x0(x_t, t, context))


def seeded_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """One noise clip per seed, each from its own generator: a (prompt, seed) pair gives the same
    clip whatever else is in the batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def sample_clips(module: torch.nn.Module, prompts: PromptEncoder, captions: list[str], seeds: list[int],
                 shape: tuple[int, ...], batch_size: int = 16, progress: bool = False,
                 **sampler: Any) -> tuple[torch.Tensor, float]:
    """Generate one clip per (caption, seed) in batches with `module.sample`; returns (clips, NFE).

    Captions and the negative prompt are embedded by `prompts`;
    `module.sample(context, negative_context, noise=..., **sampler)` must return (clips, nfe).
    """
    from tqdm.auto import tqdm

    chunks, nfe = [], 0.0
    for start in tqdm(range(0, len(seeds), batch_size), desc="sampling", disable=not progress):
        stop = start + batch_size
        positive = prompts(captions[start:stop])
        negative = prompts.negative(len(positive))
        noise = seeded_noise(seeds[start:stop], shape)
        clips, nfe = module.sample(positive.states, negative.states, noise=noise, **sampler)
        chunks.append(clips.cpu())
    return torch.cat(chunks), nfe
