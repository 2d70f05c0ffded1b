"""CriticModule: the critic role of DMD. The fake score, a Wan initialised from the teacher, x0-parameterised
(x0 = x_t - t v, Eq. 17) and trained by denoising on detached, re-noised student samples at t_dmd; and in
stage 2 the GAN discriminator heads on the teacher's block features, trained by the same optimizer."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_tmd.checkpoints import sampling_state_dict
from lightning_tmd.losses import denoising_loss, discriminator_loss
from lightning_tmd.modules.base import GeneratorModule
from lightning_tmd.nets.discriminator import Discriminator
from lightning_tmd.nets.wan import WanNet
from lightning_tmd.optim import OptimizerSettings
from lightning_tmd.schedules import interpolate, sample_shifted_uniform


class CriticModule(GeneratorModule):
    """The fake score g_fake(x_t, t, c), and optionally the discriminator of DMD2-v's GAN term.

    Args:
        model: the teacher's architecture {"path", "config", "dtype", "checkpoint_blocks"}.
        teacher_ckpt: a TeacherModule checkpoint whose (EMA) weights initialise it at the start of fit
            (None: the weights `model` loads).
        t_shift: gamma of t_dmd = shift(U(0.001, 0.999), gamma).
        discriminator: the `Discriminator`'s settings {"blocks": 1-based teacher blocks, "widths", "mlp_width"}
            ({}: one head on the last block); None: no discriminator.
        optim: `OptimizerSettings` over the fake score and the discriminator (default lr 1e-5, no warm-up);
            lr_discriminator: the learning rate of the discriminator's parameter group.
    On its own (`training_step`) it denoises the batch's clips; stage 2 steps it on `update_losses`.
    """

    OPTIM_DEFAULTS = {"lr": 1e-5}

    def __init__(self, model: dict[str, Any], teacher_ckpt: str | None = None, t_shift: float = 5.0,
                 discriminator: dict[str, Any] | None = None, optim: dict[str, Any] | None = None,
                 lr_discriminator: float = 1e-5, cond_dropout: float = 0.0) -> None:
        super().__init__()
        optim = OptimizerSettings.resolve(self.OPTIM_DEFAULTS, optim)
        self.save_hyperparameters()
        self.net = WanNet.from_settings(model)
        self.discriminator: Discriminator | None = None
        if discriminator is not None:
            settings = {"blocks": [self.net.num_blocks], **discriminator}
            channels = self.net.inner_dim // math.prod(self.net.patch_size)
            self.discriminator = Discriminator(in_channels=channels, **settings)
        self.init_ema(None)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.teacher_ckpt:
            self.load_teacher(sampling_state_dict(self.hparams.teacher_ckpt))

    def extra_param_groups(self) -> list[dict[str, Any]]:
        """The discriminator's parameters, at `lr_discriminator` (the fake score's group is the first)."""
        if self.discriminator is None:
            return []
        return [{"params": list(self.discriminator.parameters()), "lr": self.hparams.lr_discriminator,
                 "name": "discriminator"}]

    def configure_optimizers(self, total_steps: int | None = None) -> dict[str, Any]:
        config = super().configure_optimizers(total_steps)
        config["optimizer"].param_groups[0]["name"] = "fake_score"
        return config

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

    def gan_logits(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, features: Any) -> torch.Tensor:
        """Discriminator logits (B, heads) on `features(x_t, t, context, blocks)`, the teacher's block features."""
        return self.discriminator(features(x_t, t, context, self.discriminator.blocks))

    def update_losses(self, fake: torch.Tensor, real: torch.Tensor, context: torch.Tensor, t: torch.Tensor,
                      features: Any) -> dict[str, torch.Tensor]:
        """The critic's stage-2 loss: fake-score denoising on the (detached) student samples `fake`, plus the
        discriminator's BCE on `features(x_t, t, context)` (the teacher's) of fake and real clips noised at the
        same t with the same noise. Returns "loss", its two parts, and the real / fake logits."""
        noise = torch.randn_like(real)
        fake_score = self.denoising_loss_on(fake, context, t, noise)
        both = torch.cat([interpolate(fake.detach(), noise, t), interpolate(real, noise, t)])
        logits = self.gan_logits(both, torch.cat([t, t]), torch.cat([context, context]), features)
        fake_logits, real_logits = logits.chunk(2)
        gan = discriminator_loss(real_logits, fake_logits)
        return {"loss": fake_score + gan, "fake_score": fake_score, "discriminator": gan,
                "real_logits": real_logits, "fake_logits": fake_logits}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        context, _ = self.drop_condition(batch)
        loss = self.denoising_loss_on(batch["video"], context)
        self.log("train/critic_loss", loss, prog_bar=True)
        return loss
