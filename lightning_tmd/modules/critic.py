"""CriticModule: the fake score of DMD. A Wan initialised from the teacher, x0-parameterised
(x0 = x_t - t v, Eq. 17), trained by denoising on detached, re-noised student samples at t_dmd."""

from __future__ import annotations

from typing import Any

import torch

from lightning_tmd.checkpoints import sampling_state_dict
from lightning_tmd.losses import denoising_loss
from lightning_tmd.modules.base import GeneratorModule
from lightning_tmd.nets.wan import WanNet
from lightning_tmd.schedules import interpolate, sample_shifted_uniform


class CriticModule(GeneratorModule):
    """The fake score g_fake(x_t, t, c).

    Args:
        model: the teacher's architecture {"path", "config", "dtype", "checkpoint_blocks"}.
        teacher_ckpt: a TeacherModule checkpoint whose (EMA) weights initialise it at the start of fit
            (None: the weights `model` loads).
        t_shift: gamma of t_dmd = shift(U(0.001, 0.999), gamma).
        lr, betas, weight_decay, warmup_steps, lr_schedule, min_lr_ratio: AdamW with a warm-up.
    On its own (`training_step`) it denoises the batch's clips; inside stage 2 the DMD module calls
    `denoising_loss_on(samples, context)` with detached student samples.
    """

    def __init__(self, model: dict[str, Any], teacher_ckpt: str | None = None, t_shift: float = 5.0,
                 lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.01,
                 warmup_steps: int = 0, lr_schedule: str = "constant", min_lr_ratio: float = 0.1,
                 cond_dropout: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = WanNet.from_settings(model)
        self.init_ema(None)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.teacher_ckpt:
            self.net.load_state_dict(sampling_state_dict(self.hparams.teacher_ckpt))

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """g_fake(x_t, t, c) = x_t - t v_fake(x_t, t, c)."""
        return self.net.x0(x_t, t, context)

    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """t_dmd = shift(U(0.001, 0.999), t_shift), float64."""
        return sample_shifted_uniform(n, self.hparams.t_shift, generator=generator, device=device)

    def denoising_loss_on(self, samples: torch.Tensor, context: torch.Tensor, t: torch.Tensor | None = None,
                          noise: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """||g_fake((1 - t) x + t eps, t) - x||^2 on clips x (detached); t = t_dmd and eps ~ N(0, I)
        unless given (stage 2 shares them with the discriminator)."""
        x = samples.detach()
        if t is None:
            t = self.sample_t(len(x), x.device, generator)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return denoising_loss(self.x0(interpolate(x, noise, t), t, context), x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        context, _ = self.drop_condition(batch)
        loss = self.denoising_loss_on(batch["video"], context)
        self.log("train/critic_loss", loss, prog_bar=True)
        return loss
