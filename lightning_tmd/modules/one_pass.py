"""OnePassStudent: the DMD2-v baseline's student, the teacher's architecture as a one-pass generator
g(x_t, t) = x_t - t v(x_t, t) (Eq. 17), sampled deterministically on its outer grid (Eq. 18).
On its own it trains the KD warm-up: regress g(noise, t_max) onto the teacher's ODE samples."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_tmd.checkpoints import sampling_state_dict
from lightning_tmd.modules.base import GeneratorModule
from lightning_tmd.nets.wan import WanNet
from lightning_tmd.optim import OptimizerSettings
from lightning_tmd.sampling import one_pass_step
from lightning_tmd.schedulers import OnePassScheduler


class OnePassStudent(GeneratorModule):
    """A Wan that maps x_t to a clean clip in one pass; M passes per sample.

    Args:
        model: the teacher's architecture {"path", "config", "dtype", "checkpoint_blocks"}.
        teacher_ckpt: a checkpoint whose sampling weights initialise it at the start of fit (None:
            the weights `model` loads).
        outer_steps, outer_shift, t_max: M and the shifted outer grid (gamma 10; 5 for 4 steps): the module's
            `self.scheduler` (a `OnePassScheduler`).
        optim: the `OptimizerSettings` of KD training, and of stage 2 when it is the DMD2-v student (default lr
            7e-5, no warm-up). ema_decay: as TeacherModule.
    """

    OPTIM_DEFAULTS = {"lr": 7e-5}

    def __init__(self, model: dict[str, Any], teacher_ckpt: str | None = None, outer_steps: int = 1,
                 outer_shift: float = 10.0, t_max: float = 0.999, optim: dict[str, Any] | None = None,
                 ema_decay: float | None = None, cond_dropout: float = 0.0) -> None:
        super().__init__()
        if outer_steps < 1:
            raise ValueError(f"outer_steps={outer_steps} must be >= 1")
        optim = OptimizerSettings.resolve(self.OPTIM_DEFAULTS, optim)
        self.save_hyperparameters()
        self.net = WanNet.from_settings(model)
        self.scheduler = OnePassScheduler(outer_steps, outer_shift, t_max)
        self.init_ema(ema_decay)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.teacher_ckpt:
            self.load_teacher(sampling_state_dict(self.hparams.teacher_ckpt))

    # -- grid and cost: the scheduler's (None: the module's M and shift) ----------------------------
    def outer_grid(self, steps: int | None = None, shift: float | None = None) -> torch.Tensor:
        return self.scheduler.outer_grid(steps, shift)

    def effective_nfe(self, outer_steps: int | None = None, inner_steps: int | None = None) -> float:
        return self.scheduler.effective_nfe(outer_steps)

    # -- the generator -------------------------------------------------------------------------
    def generate(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, noise: torch.Tensor | None = None,
                 rollout: bool = True, net: WanNet | None = None) -> torch.Tensor:
        """g(x_t, t) = x_t - t v(x_t, t) (Eq. 17); `noise` and `rollout` do not apply to it."""
        return (net or self.net).x0(x_t, t, context)

    @torch.no_grad()
    def outer_step(self, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, context: torch.Tensor,
                   net: WanNet | None = None) -> torch.Tensor:
        """Eq. 18: x_{t'} = (1 - t'/t) g(x_t, t) + (t'/t) x_t (re-uses the implied noise, no re-noising)."""
        return one_pass_step(net or self.net, x_t, t, t_next, context)

    @torch.no_grad()
    def sample(self, context: torch.Tensor, negative_context: torch.Tensor | None = None,
               noise: torch.Tensor | None = None, shape: tuple[int, ...] | None = None,
               outer_steps: int | None = None, outer_shift: float | None = None,
               generator: torch.Generator | None = None, **unused: Any) -> tuple[torch.Tensor, float]:
        """M deterministic steps of Eq. 18 from noise; returns (clips, NFE = M). No CFG."""
        if noise is None:
            noise = torch.randn((len(context), *shape), generator=generator, device=self.device)
        net = self.sampling_net()
        was_training = net.training
        net.eval()
        x, context = noise.to(self.device), context.to(self.device)
        ones = torch.ones(len(x), dtype=torch.float64, device=x.device)
        grid = self.outer_grid(outer_steps, outer_shift)
        for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
            x = self.outer_step(x, t * ones, t_next * ones, context, net)
        net.train(was_training)
        return x, self.effective_nfe(outer_steps)

    # -- KD warm-up ----------------------------------------------------------------------------
    def kd_loss(self, batch: dict) -> torch.Tensor:
        """||g(noise, t_max) - teacher sample||^2 on teacher ODE pairs (batch: noise, video, context)."""
        noise = batch["noise"]
        t = torch.full((len(noise),), self.hparams.t_max, dtype=torch.float64, device=noise.device)
        return F.mse_loss(self.generate(noise, t, batch["context"]).float(), batch["video"].float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.kd_loss(batch)
        self.log("train/kd_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/kd_loss", self.kd_loss(batch), batch_size=len(batch["noise"]))
