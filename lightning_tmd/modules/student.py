"""StudentModule: the TMD student (backbone + recurrent flow head), stage 1 = transition-matching
MeanFlow (TM-MF, Eqs. 9-10, docs/method.md §Stage 1), or plain transition matching; `sample()` is Algorithm 1."""

from __future__ import annotations

from typing import Any

import torch

from lightning_tmd.checkpoints import sampling_state_dict
from lightning_tmd.losses import adaptive_l2_loss, finite_difference_dds, jvp_dds
from lightning_tmd.modules.base import GeneratorModule
from lightning_tmd.nets.tmd_student import CLEAN_ESTIMATES, MainFeature, TMDStudent
from lightning_tmd.nets.wan import WanNet
from lightning_tmd.optim import OptimizerSettings
from lightning_tmd.parallel import full_value
from lightning_tmd.sampling import noise_seeded_generator, tmd_sample, tmd_step
from lightning_tmd.schedulers import TMDScheduler
from lightning_tmd.schedules import broadcast_time, grid_floor, interpolate, sample_shifted_uniform

OBJECTIVES = ("tm_meanflow", "tm")
DERIVATIVES = ("finite_difference", "jvp")


class StudentModule(GeneratorModule):
    """Stage 1 of TMD: adapt the teacher-initialised student into a conditional flow map.

    Args:
        model: the teacher's architecture {"path", "config", "dtype", "checkpoint_blocks"} (as TeacherModule);
            with `model.path` the Wan weights there are the teacher.
        teacher_ckpt: a TeacherModule checkpoint whose (EMA) weights initialise the student at the
            start of fit (None: use the weights `model` loads).
        head_blocks, inner_steps, outer_steps: H, N, M. outer_shift / inner_shift: gamma of the grids.
            With t_max they make the module's sampling schedule, `self.scheduler` (a `TMDScheduler`).
        fusion: "gated" | "concat". inner_target: "velocity" (y = x1 - x) | "sample" (y = x).
        clean_estimate: "transition" (x_t - t y_hat) | "literal" (x1 - y_hat), used by stage 2.
        objective: "tm_meanflow" or "tm" (r = s for the whole batch).
        r_equals_s: fraction of the batch trained with r = s (plain TM) under "tm_meanflow".
        s_shift: gamma of s = shift(U(0.001, 0.999)). guidance_scale: CFG of the target velocity.
        derivative: "finite_difference" (delta = fd_delta, fp64 arithmetic) or "jvp" (torch.func.jvp).
        norm_constant: c of the adaptive loss as a multiple of d = dim(y_s) (1: c = d).
        optim: the `OptimizerSettings` (default lr 1e-4, 100 warm-up steps; stage 2 steps the student with this
            optimizer and schedule too). ema_decay: as TeacherModule.
    """

    OPTIM_DEFAULTS = {"lr": 1e-4, "warmup_steps": 100}

    def __init__(self, model: dict[str, Any], teacher_ckpt: str | None = None, head_blocks: int = 2,
                 inner_steps: int = 2, outer_steps: int = 2, outer_shift: float = 10.0,
                 inner_shift: float = 10.0, fusion: str = "gated", inner_target: str = "velocity",
                 clean_estimate: str = "transition", objective: str = "tm_meanflow",
                 r_equals_s: float = 0.75, s_shift: float = 3.0, guidance_scale: float = 3.0,
                 cond_dropout: float = 0.1, derivative: str = "finite_difference", fd_delta: float = 5e-3,
                 norm_constant: float = 1.0, optim: dict[str, Any] | None = None, ema_decay: float | None = None,
                 t_max: float = 0.999) -> None:
        super().__init__()
        for name, value, allowed in (("objective", objective, OBJECTIVES), ("derivative", derivative, DERIVATIVES),
                                     ("clean_estimate", clean_estimate, CLEAN_ESTIMATES)):
            if value not in allowed:
                raise ValueError(f"{name} '{value}' is unknown: use one of {allowed}")
        if min(inner_steps, outer_steps) < 1:
            raise ValueError(f"inner_steps={inner_steps} and outer_steps={outer_steps} must be >= 1")
        optim = OptimizerSettings.resolve(self.OPTIM_DEFAULTS, optim)
        self.save_hyperparameters()
        self.net = TMDStudent(WanNet.from_settings(model), head_blocks, fusion, inner_target)
        self.scheduler = TMDScheduler(outer_steps, inner_steps, outer_shift, inner_shift, head_blocks,
                                      self.net.num_blocks, t_max)
        self.init_ema(ema_decay)

    # -- grids and cost: the scheduler's (None: the module's M, N and shifts) -------------------
    def outer_grid(self, steps: int | None = None, shift: float | None = None) -> torch.Tensor:
        return self.scheduler.outer_grid(steps, shift)

    def inner_grid(self, steps: int | None = None, shift: float | None = None) -> torch.Tensor:
        return self.scheduler.inner_grid(steps, shift)

    def effective_nfe(self, outer_steps: int | None = None, inner_steps: int | None = None) -> float:
        return self.scheduler.effective_nfe(outer_steps, inner_steps)

    # -- fit ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Start fitting from the teacher's weights (a resumed run's checkpoint then overrides them)."""
        if stage == "fit" and self.hparams.teacher_ckpt:
            self.load_teacher(sampling_state_dict(self.hparams.teacher_ckpt))

    def load_teacher(self, state_dict: dict[str, torch.Tensor]) -> None:
        """The teacher's weights into the student's Wan (fusion and gap embedding keep their init)."""
        self.net.wan.load_state_dict(state_dict)
        self.load_weights(self.net.state_dict())

    # -- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, context: torch.Tensor, negative_context: torch.Tensor | None = None,
               noise: torch.Tensor | None = None, shape: tuple[int, ...] | None = None,
               outer_steps: int | None = None, inner_steps: int | None = None,
               outer_shift: float | None = None, inner_shift: float | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
        """Algorithm 1 at (M, N) = (outer_steps, inner_steps); returns (clips, effective NFE).

        No CFG (`negative_context` is accepted for a uniform sampler interface and ignored). The
        inner noise comes from `generator`; without one it is seeded by the outer noise, so a given
        `noise` always gives the same clips.
        """
        if noise is None:
            noise = torch.randn((len(context), *shape), generator=generator, device=self.device)
        if generator is None:
            generator = noise_seeded_generator(noise, self.device)
        net = self.sampling_net()
        was_training = net.training
        net.eval()
        clips = tmd_sample(net, context.to(self.device), noise.to(self.device),
                           self.outer_grid(outer_steps, outer_shift), self.inner_grid(inner_steps, inner_shift),
                           generator)
        net.train(was_training)
        return clips, self.effective_nfe(outer_steps, inner_steps)

    # -- the one-step generator of stage 2 ------------------------------------------------------
    def generate(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, noise: torch.Tensor | None = None,
                 rollout: bool = True) -> torch.Tensor:
        """g_theta(x_t, t; y1): one outer step's clean estimate x_hat (Eq. 15) from fresh inner noise,
        differentiable through the backbone and all N inner head steps (docs/method.md §Stage 2).

        `rollout=False` is the ablation of docs/method.md Q6: a single head call over the whole inner
        interval [t_max, 0]. `noise` (the outer x1) is used by the literal clean estimate only.
        """
        main = self.net.backbone(x_t, t, context)
        inner_grid = self.inner_grid() if rollout else self.inner_grid(1)
        y_hat = self.net.rollout(main, torch.randn_like(x_t), inner_grid)
        return self.net.clean_estimate(x_t, t, y_hat, self.hparams.clean_estimate, noise)

    @torch.no_grad()
    def outer_step(self, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                   context: torch.Tensor) -> torch.Tensor:
        """One step of Algorithm 1 with the training weights (backward simulation in stage 2)."""
        return tmd_step(self.net, x_t, t, t_next, context, self.inner_grid())

    # -- stage 1 -----------------------------------------------------------------------------
    def sample_outer_times(self, n: int, device: torch.device) -> torch.Tensor:
        """t_i uniform over the outer grid's points t_1..t_M (float64)."""
        points = self.outer_grid()[:-1].to(device)
        return points[torch.randint(len(points), (n,), device=device)]

    def sample_inner_times(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """s = shift_3(U(0.001, 0.999)); r = the inner-grid point at or below s; r = s on a fraction
        `r_equals_s` of the batch (all of it for plain TM). Both float64."""
        hp = self.hparams
        s = sample_shifted_uniform(n, hp.s_shift, device=device)
        if hp.objective == "tm":
            return s, s.clone()
        r = grid_floor(self.inner_grid(), s)
        same = torch.rand(n, device=device) < hp.r_equals_s
        return s, torch.where(same, s, r)

    def inner_target(self, x: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """y = x1 - x (DTM) or y = x."""
        return x1 - x if self.net.inner_target == "velocity" else x

    @torch.no_grad()
    def guided_velocity(self, v: torch.Tensor, y_s: torch.Tensor, s: torch.Tensor, y1: torch.Tensor,
                        x_t: torch.Tensor, t: torch.Tensor, negative_context: torch.Tensor,
                        dropped: torch.Tensor) -> torch.Tensor:
        """v_g = u_unc + w (v - u_unc), u_unc = u_theta(y_s, s, s; m(x_t, t, negative prompt)), on the
        rows that kept their caption; dropped rows keep v (docs/method.md Q8). Computed on every row and masked,
        so that all data-parallel ranks run the same calls (FSDP gathers weights collectively)."""
        if self.hparams.guidance_scale == 1.0:
            return v
        main = self.net.backbone(x_t, t, negative_context)
        u_unc = self.net.average_velocity(y_s, s, s, main, y1)
        guided = u_unc + self.hparams.guidance_scale * (v - u_unc)
        return torch.where(dropped.view(-1, *([1] * (v.ndim - 1))), v, guided)

    def dds(self, main: MainFeature, y1: torch.Tensor, y_s: torch.Tensor, s: torch.Tensor, r: torch.Tensor,
            tangent: torch.Tensor) -> torch.Tensor:
        """d/ds u_theta(y_s, s, r; m) along dy/ds = tangent, with m and y1 held fixed, without grad.

        Whatever the training precision, both evaluations run with autocast off on fp32 inputs (m cast once)
        and fp64 times, and the difference is taken in fp64: under bf16 a spacing of 2 delta = 0.01 in s is
        lost in the rounding of the net's outputs (docs/method.md §Stage 1, precision). The weights are the
        head's own: fp32 (bf16-mixed, or FSDP with strategy.head_param_dtype=float32) or bf16 where FSDP
        gathers the head in bf16 (then the blocks compute in bf16 and the difference is coarse).
        """
        hp = self.hparams
        main = main.detach().to(torch.float32)
        y1, y_s, tangent = y1.float(), y_s.float(), tangent.float()
        with torch.no_grad(), torch.autocast(y_s.device.type, enabled=False):
            if hp.derivative == "jvp":
                return jvp_dds(lambda y, s_: self.net.average_velocity(y, s_, r, main, y1), y_s, s, tangent).double()
            both = main.select(torch.cat([torch.arange(len(s), device=s.device)] * 2))

            def u_fn(y, s_):
                return self.net.average_velocity(y, s_, torch.cat([r, r]), both, torch.cat([y1, y1]))

            return finite_difference_dds(u_fn, y_s, s, r, tangent, hp.fd_delta, 0.0, hp.t_max)

    def stage1_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """TM-MF (Alg. 2, Eqs. 9-10; docs/method.md §Stage 1): the whole student trains; returns the loss
        and diagnostics."""
        hp = self.hparams
        x = batch["video"]
        n, device = len(x), x.device
        context, dropped = self.drop_condition(batch)
        t = self.sample_outer_times(n, device)
        x1 = torch.randn_like(x)
        x_t = interpolate(x, x1, t)
        main = self.net.backbone(x_t, t, context)  # gradient flows into the backbone
        y, y1 = self.inner_target(x, x1), torch.randn_like(x)
        s, r = self.sample_inner_times(n, device)
        y_s = interpolate(y, y1, s)
        v = self.guided_velocity(y1 - y, y_s, s, y1, x_t, t, batch["negative_context"], dropped)
        # u_tgt = v - (s - r) du/ds; on the rows with r = s it is v. Every row is computed (same calls on
        # every data-parallel rank); the derivative is skipped only when no row jumps (plain TM)
        jump = s > r
        target = v
        if hp.objective == "tm_meanflow":
            dds = self.dds(main, y1, y_s, s, r, v)
            target = (v.double() - broadcast_time(s - r, v) * dds).to(v.dtype)
        u = self.net.average_velocity(y_s, s, r, main, y1)
        d = y_s[0].numel()
        loss = adaptive_l2_loss(u, target.detach(), hp.norm_constant * d)
        return {"loss": loss, "mse": (u.detach() - target).pow(2).mean(), "jump_fraction": jump.float().mean()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.stage1_loss(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log("train/mse", out["mse"])
        self.log("train/jump_fraction", out["jump_fraction"])
        if hasattr(self.net.fusion, "gate_logit"):  # sigmoid of the gate logit (gathered under FSDP)
            self.log("train/fusion_gate", torch.sigmoid(full_value(self.net.fusion.gate_logit.detach())).squeeze(0))
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Plain-TM error ||y_est - y||^2 of the head's estimate of y at (y_s, s, s) (the head itself, or
        x_t - t head for y = x) at each outer time and s in {0.3, 0.7}, fixed noise."""
        x = batch["video"]
        g = torch.Generator(device=x.device).manual_seed(batch_idx)
        x1 = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        y1 = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        y = self.inner_target(x, x1)
        for t_value in self.outer_grid()[:-1].tolist():
            t = torch.full((len(x),), t_value, dtype=torch.float64, device=x.device)
            x_t = interpolate(x, x1, t)
            main = self.net.backbone(x_t, t, batch["context"])
            for s_value in (0.3, 0.7):
                s = torch.full_like(t, s_value)
                y_s = (1 - s_value) * y + s_value * y1
                error = (self.net.inner_estimate(self.net.head(y_s, s, s, main), main) - y).pow(2).mean()
                self.log(f"val/head_mse_t{t_value:.3f}_s{s_value}", error, batch_size=len(x))
