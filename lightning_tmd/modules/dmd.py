"""DMDModule: stage 2 of TMD, DMD2-v with the flow head rolled out inside every outer step, and the
DMD2-v baseline (docs/method.md §Stage 2, §Baselines). Manual optimization over two trained roles and a
frozen teacher, each role stepped with the optimizer and schedule of its own `configure_optimizers`:

    iteration k % student_every == 0:  student <- VSD (guided teacher vs fake score) + lambda GAN
    otherwise:                         critic  <- fake score: denoising of re-noised student samples
                                                  + discriminator: BCE on teacher features of noised real / fake

Student inputs are noised data at a point of the student's outer grid (no outer backward simulation;
DMD2's backward simulation is an option for data-free runs). Noise levels t_dmd = shift_5(U).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

from lightning_tmd.checkpoints import (
    PAPER_GUIDANCE,
    read_checkpoint,
    sampling_guidance,
    sampling_state_dict,
    sampling_weights,
)
from lightning_tmd.losses import generator_gan_loss, vsd_gradient, vsd_loss_along
from lightning_tmd.modules.base import GeneratorModule, planned_steps
from lightning_tmd.modules.critic import CriticModule
from lightning_tmd.modules.one_pass import OnePassStudent
from lightning_tmd.modules.student import StudentModule
from lightning_tmd.modules.teacher import TeacherModule
from lightning_tmd.optim import OptimizerSettings
from lightning_tmd.parallel import full_value, prepare_nets, reshard
from lightning_tmd.schedules import broadcast_time, interpolate

STUDENTS: dict[str, type[GeneratorModule]] = {"tmd": StudentModule, "one_pass": OnePassStudent}


def student_settings(student: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(kind, constructor arguments) of stage 2's student settings; a None setting takes the class default."""
    settings = {key: value for key, value in student.items() if value is not None}
    return settings.pop("kind", "tmd"), settings


TEACHER_PREFIX = "teacher."
LEGACY_DISCRIMINATOR_PREFIX, DISCRIMINATOR_PREFIX = "discriminator.", "critic.discriminator."


class DMDModule(L.LightningModule):
    """Stage 2: student, fake-score critic and discriminator against a frozen teacher.

    Args:
        model: the teacher's architecture {"path", "config", "dtype", "checkpoint_blocks"}; student
            and critic share it.
        student: {"kind": "tmd" | "one_pass", **arguments of StudentModule / OnePassStudent}: the student
            role with its optimizer settings (lr, warmup_steps, ...; head_blocks, outer_steps, inner_steps, ...
            for TMD; outer_steps for DMD2-v).
        critic: arguments of CriticModule: the critic role (fake score and discriminator {"blocks": 1-based
            teacher blocks, "widths": (c2, c3, c4), "mlp_width"}), its t_dmd shift and its optimizer settings
            (lr, lr_discriminator, ...).
        teacher_ckpt: the TeacherModule checkpoint of the real score (None: `model.path`'s weights).
            The teacher is rebuilt from it for every fit and never saved into a stage-2 checkpoint.
        student_ckpt: where the student starts: a stage-1 (TMD) or KD (DMD2-v) checkpoint; None:
            the teacher's weights.
        student_every: the student updates on iterations k % student_every == 0, the critic and the
            discriminator on the others (paper: 5, i.e. 4 critic updates per student update).
        guidance_scale: the teacher's CFG in the VSD direction; None: the CFG the teacher checkpoint samples
            with (its `guidance_scale`), or the paper's 5 for a teacher from `model.path`. The VSD target is
            then the distribution the teacher's own sampler draws. gan_weight: lambda.
        rollout: TMD only; False trains with one head call over [t_max, 0] (docs/method.md Q6 ablation).
        backward_simulation: build the student's input x_{t_i} by running the student (no grad) from
            noise instead of noising data (DMD2); the GAN's real branch still reads the batch.
        grad_clip: max gradient norm of each role's parameter group (None: no clipping).
        histogram_every: iterations between TensorBoard histograms of t_dmd and t_student.
        teacher_dtype: dtype of the frozen teacher's weights (e.g. "bfloat16" beside fp32 trained roles:
            half its memory; needs trainer.precision=bf16-mixed). None: the model's dtype.

    Optimizers and LR schedules: the roles' own (`configure_optimizers` of each); the critic's two parameter
    groups, fake score and discriminator, have their own learning rates and clipping and step together on one
    combined loss. One optimizer step per iteration keeps Lightning's `global_step` equal to the iteration
    count (it counts every `optimizer.step()` under manual optimization); a role's schedule counts its own
    steps.
    """

    def __init__(self, model: dict[str, Any], student: dict[str, Any], critic: dict[str, Any] | None = None,
                 teacher_ckpt: str | None = None, student_ckpt: str | None = None, student_every: int = 5,
                 guidance_scale: float | None = None, gan_weight: float = 0.03, rollout: bool = True,
                 backward_simulation: bool = False, grad_clip: float | None = 1.0, histogram_every: int = 100,
                 teacher_dtype: str | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        kind, student_args = student_settings(student)
        if kind not in STUDENTS:
            raise ValueError(f"stage.module.student.kind '{kind}' is unknown: use one of {tuple(STUDENTS)}")
        if student_every < 2:
            raise ValueError(f"stage.module.student_every={student_every}: use >= 2 so the critic updates too")
        if guidance_scale is not None and guidance_scale <= 0:
            raise ValueError(f"stage.module.guidance_scale={guidance_scale}: give a positive CFG scale (1: no "
                             "guidance), or null for the teacher's own sampling CFG")
        self.save_hyperparameters()
        self.student = STUDENTS[kind](model=model, **student_args)
        self.critic = CriticModule(model, **{"discriminator": {}, **(critic or {})})
        if self.critic.discriminator is None:
            raise ValueError("stage.module.critic.discriminator is null: stage 2 trains a discriminator; give its "
                             "settings ({} for one head on the last teacher block)")
        self.teacher: TeacherModule | None = None  # built for fitting only (`configure_model`)
        # the real score's CFG; with a teacher checkpoint and no explicit scale, read from it in `configure_model`
        self.real_guidance = guidance_scale if guidance_scale is not None or teacher_ckpt else PAPER_GUIDANCE
        self.iteration = 0  # own counter: decides who updates; checkpointed
        self._times: dict[str, list[torch.Tensor]] = {"t_dmd": [], "t_student": []}

    @staticmethod
    def upgrade_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
        """The constructor arguments, in today's layout, of a DMDModule checkpoint written while the roles'
        optimizer settings were DMDModule's own (lr_student, lr_critic, lr_discriminator, betas, weight_decay,
        adam_eps, t_shift and discriminator at the top level); {} for a checkpoint of today's layout. Pass them
        as overrides to `load_from_checkpoint` (`generators.load_generator` does)."""
        if "critic" in hparams or "lr_student" not in hparams:
            return {}
        shared = OptimizerSettings.from_flat(hparams)  # betas, weight_decay, adam_eps: both roles
        student = {**hparams["student"], "optim": {"lr": hparams["lr_student"], "warmup_steps": 0, **shared}}
        critic = {"optim": {"lr": hparams.get("lr_critic", 1e-5), **shared},
                  "lr_discriminator": hparams.get("lr_discriminator", 1e-5), "t_shift": hparams.get("t_shift", 5.0),
                  "discriminator": dict(hparams.get("discriminator") or {})}
        return {"student": student, "critic": critic}

    # -- what sampling and evaluation see ---------------------------------------------------------
    @property
    def net(self) -> torch.nn.Module:
        return self.student.net

    def sample(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, float]:
        """The student's sampler (Algorithm 1 for TMD, Eq. 18 for DMD2-v): (clips, effective NFE)."""
        return self.student.sample(*args, **kwargs)

    def effective_nfe(self, *args: Any, **kwargs: Any) -> float:
        return self.student.effective_nfe(*args, **kwargs)

    # -- models ----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """For fitting only (not to sample from a checkpoint): the frozen real score (eval mode, no
        grad, in no optimizer), a teacher-initialised critic and the student's starting weights, with
        the teacher checkpoint read once. Then the nets are sharded (strategy=fsdp), the empty ones read from
        model.path (model.meta_init), and a student checkpoint read into the student's shards. A resumed run's
        checkpoint then overrides critic and student."""
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        starting = fitting and self.teacher is None
        if starting:
            self.teacher = self.build_teacher_and_starting_weights()
        prepare_nets(self)
        if starting and self.hparams.student_ckpt:
            self.student.load_weights(sampling_state_dict(self.hparams.student_ckpt))

    def build_teacher_and_starting_weights(self) -> TeacherModule:
        """The frozen teacher, and the critic and student initialised from it (the student's own checkpoint is
        read after sharding, `configure_model`)."""
        hp = self.hparams
        teacher = TeacherModule(hp.model, ema_decay=None)
        checkpoint = read_checkpoint("stage.module.teacher_ckpt", hp.teacher_ckpt) if hp.teacher_ckpt else {}
        teacher_weights = sampling_weights(checkpoint["state_dict"]) if checkpoint else None
        if hp.guidance_scale is None:
            self.real_guidance = sampling_guidance(checkpoint)
        if teacher_weights is not None:  # else model.path's weights are already in all three
            teacher.net.load_state_dict(teacher_weights)
            self.critic.load_teacher(teacher_weights)
        if teacher_weights is not None and not hp.student_ckpt:
            self.student.load_teacher(teacher_weights)
        if hp.teacher_dtype:
            teacher.net.cast(getattr(torch, hp.teacher_dtype))
        return teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> DMDModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict[str, Any]]]:
        """The student's and the critic's own optimizers and LR schedules, in that order; each schedule spans the
        steps its role takes in `trainer.max_steps` iterations (the student's every `student_every`-th)."""
        total = planned_steps(self._trainer)
        student_steps = None if total is None else math.ceil(total / self.hparams.student_every)
        roles = [self.student.configure_optimizers(student_steps),
                 self.critic.configure_optimizers(None if total is None else total - student_steps)]
        roles[0]["optimizer"].param_groups[0]["name"] = "student"
        return [role["optimizer"] for role in roles], [role["lr_scheduler"] for role in roles]

    def on_train_start(self) -> None:
        self.log("train/real_guidance", float(self.real_guidance), rank_zero_only=True)

    def on_fit_start(self) -> None:
        if "16" in str(self.trainer.precision) and "bf16" not in str(self.trainer.precision):
            raise ValueError(f"trainer.precision={self.trainer.precision}: stage 2 clips each role's gradients "
                             "without a loss scaler; use 32-true or bf16-mixed")
        if self.hparams.teacher_dtype not in (None, "float32") and "mixed" not in str(self.trainer.precision):
            raise ValueError(f"stage.module.teacher_dtype={self.hparams.teacher_dtype} needs autocast: set "
                             "trainer.precision=bf16-mixed (or teacher_dtype=null)")

    # -- checkpoints: no teacher, plus the iteration counter -----------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Without the frozen teacher: it is reloaded from its source (also what sharded checkpoints see)."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "") + TEACHER_PREFIX
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        """Strict about everything except the teacher, which checkpoints do not hold. Reads the discriminator of
        checkpoints written while it sat beside the critic (`discriminator.*`)."""
        state_dict = {(DISCRIMINATOR_PREFIX + k.removeprefix(LEGACY_DISCRIMINATOR_PREFIX)
                       if k.startswith(LEGACY_DISCRIMINATOR_PREFIX) else k): v for k, v in state_dict.items()}
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(TEACHER_PREFIX)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"DMDModule checkpoint: missing keys {missing[:5]}, unexpected keys "
                               f"{result.unexpected_keys[:5]}")
        return result

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dmd_iteration"] = self.iteration
        checkpoint["real_guidance"] = self.real_guidance

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.iteration = int(checkpoint.get("dmd_iteration", 0))

    # -- the pieces of an iteration ------------------------------------------------------------------
    def is_student_turn(self) -> bool:
        return self.iteration % self.hparams.student_every == 0

    def sample_t_dmd(self, n: int) -> torch.Tensor:
        t = self.critic.sample_t(n, self.device)
        self._times["t_dmd"].append(t.detach().cpu())
        return t

    def student_input(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_{t_i}, t_i, x1) with t_i uniform over the points t_1..t_M of the student scheduler's outer grid:
        noised data, or with `backward_simulation` the student's own no-grad sampler run from x1 down to t_i."""
        grid = self.student.scheduler.outer_grid().to(x.device)
        index = torch.randint(len(grid) - 1, (len(x),), device=x.device)
        t, noise = grid[index], torch.randn_like(x)
        self._times["t_student"].append(t.cpu())
        if not self.hparams.backward_simulation:
            return interpolate(x, noise, t), t, noise
        with torch.no_grad():
            state, x_t = noise, noise.clone()
            ones = torch.ones(len(x), dtype=torch.float64, device=x.device)
            for step in range(len(grid) - 2):  # all steps, not max(index): every rank runs the same calls
                state = self.student.outer_step(state, grid[step] * ones, grid[step + 1] * ones, context)
                x_t = torch.where((index == step + 1).view(-1, *([1] * (x.ndim - 1))), state, x_t)
        return x_t, t, noise

    def student_sample(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x_hat = g_theta(x_{t_i}, t_i): the student's clean estimate (TMD: after the rollout)."""
        x_t, t, noise = self.student_input(x, context)
        return self.student.generate(x_t, t, context, noise=noise, rollout=self.hparams.rollout)

    def teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   negative_context: torch.Tensor) -> torch.Tensor:
        """The real score's x0 with CFG (one batched forward), without grad."""
        with torch.no_grad():
            v = self.teacher.guided_velocity(x_t, t, context, negative_context, self.real_guidance)
            return x_t - broadcast_time(t, x_t) * v

    def discriminate(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The critic's discriminator logits (B, heads) on the frozen teacher's block features of x_t."""
        return self.critic.gan_logits(x_t, t, context, self.teacher.discriminator_features)

    def clip_and_step(self, role: int) -> dict[str, torch.Tensor]:
        """Clip each parameter group of role `role` (0: student, 1: critic) to `grad_clip`, step its optimizer
        and LR schedule; returns the pre-clip gradient norms by group name."""
        optimizer, schedule = self.optimizers()[role], self.lr_schedulers()[role]
        norms = {}
        max_norm = self.hparams.grad_clip or float("inf")
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
            norms[group["name"]] = full_value(norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)  # free this role's gradients while the other roles train
        # under FSDP the nets' own weights (embeddings, fusion, output layers) stay gathered after a forward
        # without backward (e.g. the student's samples in a critic update): drop the gathered copies, so the
        # next forward gathers the weights this step has just changed. No-op without FSDP.
        reshard(self)
        return norms

    # -- the two updates -----------------------------------------------------------------------------
    def student_update(self, batch: dict) -> dict[str, torch.Tensor]:
        """VSD + lambda GAN through the student (TMD: through all N inner head steps)."""
        hp = self.hparams
        optimizer = self.optimizers()[0]
        context, negative = batch["context"], batch["negative_context"]
        with self.toggled_optimizer(optimizer):
            x_hat = self.student_sample(batch["video"], context)
            t = self.sample_t_dmd(len(x_hat))
            x_hat_t = interpolate(x_hat, torch.randn_like(x_hat), t)
            x0_teacher = self.teacher_x0(x_hat_t.detach(), t, context, negative)
            with torch.no_grad():
                x0_fake = self.critic.x0(x_hat_t.detach(), t, context)
            direction = vsd_gradient(x_hat, x0_fake, x0_teacher)
            vsd = vsd_loss_along(x_hat, direction)
            loss, out = vsd, {"vsd": vsd.detach()}
            if hp.gan_weight > 0:
                logits = self.discriminate(x_hat_t, t, context)
                gan = generator_gan_loss(logits)
                loss = loss + hp.gan_weight * gan
                out["gan_generator"] = gan.detach()
                out["d_fake_logit_student_step"] = logits.detach().mean()
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            norms = self.clip_and_step(0)
        self.student.update_ema()
        out["vsd_grad_norm"] = direction.flatten(1).norm(dim=1).mean() / math.sqrt(direction[0].numel())
        out["grad_norm_student"] = norms["student"]
        out["student_loss"] = loss.detach()
        return out

    def critic_update(self, batch: dict) -> dict[str, torch.Tensor]:
        """The critic's loss (`CriticModule.update_losses`) on detached student samples and the batch."""
        optimizer = self.optimizers()[1]
        x, context = batch["video"], batch["context"]
        with self.toggled_optimizer(optimizer):
            with torch.no_grad():
                x_hat = self.student_sample(x, context)
            t = self.sample_t_dmd(len(x))
            losses = self.critic.update_losses(x_hat, x, context, t, self.teacher.discriminator_features)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(losses["loss"])
            norms = self.clip_and_step(1)
        real_logits, fake_logits = losses["real_logits"].detach(), losses["fake_logits"].detach()
        real_right, fake_right = (real_logits > 0).float().mean(), (fake_logits < 0).float().mean()
        return {"fake_score_loss": losses["fake_score"].detach(),
                "discriminator_loss": losses["discriminator"].detach(),
                "d_real_logit": real_logits.mean(), "d_fake_logit": fake_logits.mean(),
                "d_accuracy": (real_right + fake_right) / 2, "d_accuracy_real": real_right,
                "d_accuracy_fake": fake_right, "grad_norm_fake_score": norms["fake_score"],
                "grad_norm_discriminator": norms["discriminator"], "critic_loss": losses["loss"].detach()}

    def training_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """One iteration: the student's update or the critic's; returns its (detached) losses."""
        out = self.student_update(batch) if self.is_student_turn() else self.critic_update(batch)
        self.iteration += 1
        for name, value in out.items():
            self.log(f"train/{name}", value, prog_bar=name in ("vsd", "critic_loss"))
        self.log("train/iteration", float(self.iteration))
        if self.hparams.histogram_every and self.iteration % self.hparams.histogram_every == 0:
            self.log_time_histograms()
        return out

    def log_time_histograms(self) -> None:
        for name, values in self._times.items():
            if values:
                for logger in self.loggers:
                    if isinstance(logger, TensorBoardLogger):
                        logger.experiment.add_histogram(f"times/{name}", torch.cat(values), self.iteration)
            values.clear()
