"""TeacherModule: the flow-matching video model (trained from scratch for the embedded default,
or loaded from a Wan diffusers folder), with velocity, x0, batched CFG and an Euler sampler."""

from __future__ import annotations

from typing import Any

import torch

from lightning_tmd.losses import flow_matching_loss
from lightning_tmd.modules.base import GeneratorModule
from lightning_tmd.nets.wan import WanNet
from lightning_tmd.nets.wan_parts import wan_timestep
from lightning_tmd.optim import OptimizerSettings
from lightning_tmd.sampling import check_guidance_interval, euler_sample, guided_velocity_fn, noise_seeded_generator
from lightning_tmd.schedules import (
    interpolate,
    sample_train_times,
    shift_setting,
    shifted_grid,
    steps_setting,
    with_high_noise,
)


class TeacherModule(GeneratorModule):
    """Flow matching: x_t = (1 - t) x + t noise, target v = noise - x; CFG with the negative prompt.

    Args:
        model: {"path": diffusers folder or None, "config": WanTransformer3DModel kwargs,
            "dtype": torch dtype name used when loading, "checkpoint_blocks": bool}.
        optim: the optimizer and LR schedule, an `OptimizerSettings` (name "adamw" or "muon", lr, betas,
            weight_decay, eps, warmup_steps, schedule "constant" or "cosine", min_lr_ratio); given keys override
            the teacher's defaults lr 5e-4 with 200 warm-up steps.
        time_sampling: "logit_normal" or "shifted_uniform" (with `time_shift`).
        high_noise_fraction, high_noise_min: that fraction of the training times is drawn from
            U(high_noise_min, 0.999) instead (`schedules.with_high_noise`).
        cond_dropout: probability of replacing a caption by the negative prompt while training.
        ema_decay: EMA of the weights used for sampling, with a warm-up (None: sample with the raw weights).
        sample_steps, sample_shift, guidance_scale, guidance_interval, sample_churn: defaults of `sample()`.
    """

    OPTIM_DEFAULTS = {"lr": 5e-4, "warmup_steps": 200}

    def __init__(self, model: dict[str, Any], optim: dict[str, Any] | None = None,
                 time_sampling: str = "logit_normal", time_shift: float = 1.0, logit_mean: float = 0.0,
                 logit_std: float = 1.0, high_noise_fraction: float = 0.0, high_noise_min: float = 0.9,
                 cond_dropout: float = 0.1, ema_decay: float | None = 0.999, sample_steps: int = 50,
                 sample_shift: float = 3.0, guidance_scale: float = 4.0,
                 guidance_interval: tuple[float, float] | None = None, sample_churn: float = 0.0) -> None:
        super().__init__()
        check_guidance_interval(guidance_interval)
        optim = OptimizerSettings.resolve(self.OPTIM_DEFAULTS, optim)
        self.save_hyperparameters()
        self.net = WanNet.from_settings(model)
        self.init_ema(ema_decay)

    # -- predictions ---------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 net: WanNet | None = None) -> torch.Tensor:
        """v(x_t, t, c) with t in [0, 1], shape (B,)."""
        return (net or self.net).velocity(x_t, t, context)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
           net: WanNet | None = None) -> torch.Tensor:
        """Clean estimate x0 = x_t - t v."""
        return (net or self.net).x0(x_t, t, context)

    def guided_velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                        negative_context: torch.Tensor, scale: float,
                        net: WanNet | None = None) -> torch.Tensor:
        """CFG in one batched forward: uncond + g (cond - uncond), uncond = the negative prompt."""
        v = self.velocity(torch.cat([x_t, x_t]), torch.cat([t, t]),
                          torch.cat([context, negative_context]), net)
        cond, uncond = v.chunk(2)
        return uncond + scale * (cond - uncond)

    def discriminator_features(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                               blocks: list[int]) -> list[torch.Tensor]:
        """The unpatchified hidden states after the 1-based `blocks` at (x_t, t in [0, 1], c): what stage 2's
        discriminator heads read (Table 3)."""
        return self.net.block_features(x_t, wan_timestep(t), context.to(x_t.dtype), blocks)

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, context: torch.Tensor, negative_context: torch.Tensor | None = None,
               noise: torch.Tensor | None = None, shape: tuple[int, ...] | None = None,
               steps: int | None = None, shift: float | None = None,
               guidance_scale: float | None = None, guidance_interval: tuple[float, float] | None = None,
               churn: float | None = None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Euler flow sampling on a shifted grid; returns (clips, NFE).

        Give `noise` (B, C, T, H, W) or `shape` (C, T, H, W) (noise then comes from `generator`).
        CFG runs when `guidance_scale != 1` (then `negative_context` is required), at the steps whose t
        lies in `guidance_interval` = [t_low, t_high] when given (else at every step); the other steps
        use the conditional velocity alone. `churn` > 0 makes the sampler stochastic (see `euler_sample`);
        its noise comes from `generator`, else from a generator seeded by the starting noise, so a given
        noise always gives the same clips. NFE counts the network evaluations, two per guided step.
        """
        hp = self.hparams
        steps = steps_setting(steps, hp.sample_steps, "steps")
        shift = shift_setting(shift, hp.sample_shift, "shift")
        scale = hp.guidance_scale if guidance_scale is None else guidance_scale
        interval = check_guidance_interval(hp.guidance_interval if guidance_interval is None else guidance_interval)
        churn = hp.sample_churn if churn is None else churn
        if noise is None:
            noise = torch.randn((len(context), *shape), generator=generator, device=self.device)
        net = self.sampling_net()
        context = context.to(self.device)

        def conditional(x, t):
            return self.velocity(x, t, context, net)

        guided = None
        if scale != 1.0:
            if negative_context is None:
                raise ValueError("guidance_scale != 1 needs negative_context (the negative prompt)")
            negative_context = negative_context.to(self.device)

            def guided(x, t):
                return self.guided_velocity(x, t, context, negative_context, scale, net)

        velocity, nfe = guided_velocity_fn(conditional, guided, interval)

        was_training = net.training
        net.eval()
        noise = noise.to(self.device)
        if churn and generator is None:
            generator = noise_seeded_generator(noise, self.device)
        clips = euler_sample(velocity, noise, shifted_grid(steps, shift), churn, generator)
        net.train(was_training)
        return clips, nfe()

    # -- training ------------------------------------------------------------------------------
    def flow_loss(self, batch: dict, t: torch.Tensor, noise: torch.Tensor,
                  context: torch.Tensor) -> torch.Tensor:
        x = batch["video"]
        x_t = interpolate(x, noise, t)
        return flow_matching_loss(self.velocity(x_t, t, context), x, noise)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["video"]
        hp = self.hparams
        t = sample_train_times(len(x), hp.time_sampling, gamma=hp.time_shift, mean=hp.logit_mean,
                               std=hp.logit_std, device=x.device)
        t = with_high_noise(t, hp.high_noise_fraction, hp.high_noise_min)
        loss = self.flow_loss(batch, t, torch.randn_like(x), self.drop_condition(batch)[0])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss at fixed times and fixed noise (seeded by the batch index), so curves are comparable."""
        x = batch["video"]
        g = torch.Generator(device=x.device).manual_seed(batch_idx)
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        for t_value in (0.25, 0.5, 0.75):
            t = torch.full((len(x),), t_value, dtype=torch.float64, device=x.device)
            loss = self.flow_loss(batch, t, noise, batch["context"])
            self.log(f"val/loss_t{t_value}", loss, batch_size=len(x))
