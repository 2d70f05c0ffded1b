"""The students' sampling schedules as diffusers schedulers (docs/method.md §Sampling and effective NFE).

    scheduler = TMDScheduler(outer_steps=2, inner_steps=2, head_blocks=2, num_blocks=6)
    scheduler.set_timesteps(outer_steps=1, inner_steps=4)
    scheduler.timesteps           # outer grid t_M = t_max > ... > t_0 = 0 (float64)
    scheduler.inner_timesteps     # inner grid s_N = t_max > ... > s_0 = 0
    scheduler.effective_nfe(1, 4)  # Eq. 16

`TMDScheduler` is the TMD student's (outer grid, inner grid, Eq. 4 outer and Eq. 13 inner updates, Eq. 16
NFE); `OnePassScheduler` the DMD2-v student's (outer grid, Eq. 18 update, NFE = M; no inner grid). Both
grids are `schedules.shifted_grid`; t = 1 is noise. A scheduler never calls a network: the student
predicts, the scheduler steps. Settings given as None take the scheduler's defaults (its config); zero or
negative steps and shifts are errors (`schedules.steps_setting`, `schedules.shift_setting`).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from lightning_tmd.schedules import broadcast_time, shift_setting, shifted_grid, steps_setting


def check_config(**settings: float) -> None:
    """A scheduler's defaults: steps and blocks positive integers, shifts positive numbers."""
    for name, value in settings.items():
        integer = not name.endswith("shift")
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}; got {value!r}")


class OuterGridScheduler(SchedulerMixin, ConfigMixin):
    """What both students' schedulers share: the shifted outer grid of M steps from t_max to 0."""

    order = 1

    def outer_grid(self, steps: int | None = None, shift: float | None = None) -> torch.Tensor:
        """t_M = t_max > ... > t_0 = 0, `steps + 1` float64 times (default: the config's M and gamma)."""
        c = self.config
        return shifted_grid(steps_setting(steps, c.outer_steps, "outer_steps"),
                            shift_setting(shift, c.outer_shift, "outer_shift"), c.t_max)

    def set_timesteps(self, outer_steps: int | None = None, inner_steps: int | None = None,
                      device: torch.device | str | None = None, outer_shift: float | None = None,
                      inner_shift: float | None = None) -> None:
        """`self.timesteps`: the outer grid for a sampling run (None: the defaults), on `device`."""
        self.timesteps = self.outer_grid(outer_steps, outer_shift).to(device)
        self.num_inference_steps = len(self.timesteps) - 1


class OnePassScheduler(OuterGridScheduler):
    """The one-pass (DMD2-v) student's sampler: M deterministic steps of Eq. 18 on the outer grid.

    It has no inner grid: `inner_steps` and `inner_shift` are accepted and ignored, so that a sampler
    treats both students alike.

    Args:
        outer_steps, outer_shift, t_max: the default M, the outer grid's gamma and first time.
    """

    @register_to_config
    def __init__(self, outer_steps: int = 1, outer_shift: float = 10.0, t_max: float = 0.999) -> None:
        check_config(outer_steps=outer_steps, outer_shift=outer_shift)
        self.set_timesteps()

    @staticmethod
    def outer_step(x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Eq. 18: x_{t'} = (1 - t'/t) g + (t'/t) x_t, from the clean estimate g = x0 (t, t_next: (B,))."""
        ratio = broadcast_time(t_next / t, x_t)
        return (1 - ratio) * x0 + ratio * x_t

    def effective_nfe(self, outer_steps: int | None = None, inner_steps: int | None = None) -> float:
        """M: one full pass per outer step (`inner_steps` is ignored)."""
        return float(steps_setting(outer_steps, self.config.outer_steps, "outer_steps"))


class TMDScheduler(OuterGridScheduler):
    """The TMD student's sampler (Algorithm 1): M outer steps, each an N-step inner flow of the head.

    Args:
        outer_steps, inner_steps: the default M and N.
        outer_shift, inner_shift: gamma of the outer and the inner grid.
        head_blocks, num_blocks: H and L, for the effective NFE (Eq. 16).
        t_max: the first time of both grids.
    """

    @register_to_config
    def __init__(self, outer_steps: int = 2, inner_steps: int = 2, outer_shift: float = 10.0,
                 inner_shift: float = 10.0, head_blocks: int = 5, num_blocks: int = 30, t_max: float = 0.999) -> None:
        check_config(outer_steps=outer_steps, inner_steps=inner_steps, outer_shift=outer_shift,
                     inner_shift=inner_shift, head_blocks=head_blocks, num_blocks=num_blocks)
        self.set_timesteps()

    def inner_grid(self, steps: int | None = None, shift: float | None = None) -> torch.Tensor:
        """s_N = t_max > ... > s_0 = 0, `steps + 1` float64 times (default: the config's N and gamma)."""
        c = self.config
        return shifted_grid(steps_setting(steps, c.inner_steps, "inner_steps"),
                            shift_setting(shift, c.inner_shift, "inner_shift"), c.t_max)

    def set_timesteps(self, outer_steps: int | None = None, inner_steps: int | None = None,
                      device: torch.device | str | None = None, outer_shift: float | None = None,
                      inner_shift: float | None = None) -> None:
        """`self.timesteps` and `self.inner_timesteps`: the outer and inner grids (None: the defaults)."""
        outer, inner = self.outer_grid(outer_steps, outer_shift), self.inner_grid(inner_steps, inner_shift)
        self.timesteps, self.inner_timesteps = outer.to(device), inner.to(device)
        self.num_inference_steps, self.num_inner_steps = len(outer) - 1, len(inner) - 1

    @staticmethod
    def outer_step(x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """Eq. 4: x_{t'} = x_t - (t - t') y, with y the outer velocity x1 - x (t, t_next: (B,))."""
        return x_t - broadcast_time(t - t_next, x_t) * velocity

    @staticmethod
    def inner_step(y_s: torch.Tensor, s: float, r: float, u: torch.Tensor) -> torch.Tensor:
        """Eq. 13, the flow map from s down to r: y_r = y_s - (s - r) u, u the average velocity (Eq. 14)."""
        return y_s - (s - r) * u

    def effective_nfe(self, outer_steps: int | None = None, inner_steps: int | None = None) -> float:
        """Eq. 16: DiT blocks evaluated / L = M (1 + (N - 1) H / L). One outer step is a full pass (L - H
        backbone blocks + the first H-block head call); each further inner step adds H / L."""
        c = self.config
        m = steps_setting(outer_steps, c.outer_steps, "outer_steps")
        n = steps_setting(inner_steps, c.inner_steps, "inner_steps")
        return m * (1 + (n - 1) * c.head_blocks / c.num_blocks)
